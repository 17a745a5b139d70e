//! The executor on hand-built plans against the fake world: lifecycles end to end, failure isolation, retries,
//! crash recovery, cancel, concurrency and secrecy.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ciscale::apply::{
    apply, bootstrap_env, ApplyOptions, ApplyReport, NoProgress, Outcome, Progress, AGENT_COMMAND, CREDENTIAL_PATH,
};
use ciscale::model::{
    AgentId, AgentSpec, BackendBinding, BackendKind, BackendName, BackendObservation, BackendSpec, Billing, CiBinding,
    CiKind, CiName, CiSourceSpec, Desired, FakeSpec, GithubAuth, GithubScope, GithubSpec, GoDuration, Instance,
    InstanceId, InstanceMode, InstanceState, PoolName, PoolSpec, ScalePolicy, Secret, EPHEMERAL_LABEL, OWNER_LABEL,
    POOL_LABEL,
};
use ciscale::plan::{Action, AgentTarget, Change, Cost, InstanceTarget, Plan, Summary};
use ciscale::providers::fake::{sha256_hex, FakeBackend, FakeWorld, Fault, FaultKind, Op};
use ciscale::providers::{
    AgentCredential, Backend, Capabilities, CiSource, CreateInstance, Error, Exec, ExecOutput, ListInstances,
    Providers, PushFile,
};
use tokio::sync::watch;

use crate::conformance::owned_request;

const OWNER: &str = "apply-tests";
/// Recognisable, so a leak anywhere is found by a plain substring search.
const SECRET: &str = "s3cr3t-GIT-TOKEN-must-not-leak";

fn options() -> ApplyOptions {
    ApplyOptions {
        concurrency: 4,
        ci_concurrency: 4,
        ready_timeout: Duration::from_secs(5),
        poll: Duration::from_millis(1),
    }
}

fn desired() -> Desired {
    let pool = PoolSpec {
        name: PoolName::new("linux"),
        ci: CiBinding {
            source: CiName::new("ci"),
            labels: BTreeMap::from([("platform".to_owned(), "linux/amd64".to_owned())]),
            capabilities: BTreeMap::new(),
        },
        backend: BackendBinding {
            backend: BackendName::new("fake"),
            mode: InstanceMode::Create,
            machine: BTreeMap::from([("server_type".to_owned(), "cx22".to_owned())]),
        },
        agent: AgentSpec {
            image: None,
            env: BTreeMap::from([("WOODPECKER_MAX_WORKFLOWS".to_owned(), "1".to_owned())]),
            secret_env: BTreeMap::from([("GIT_TOKEN".to_owned(), Secret::new(SECRET))]),
            preregistered: None,
        },
        scale: ScalePolicy::default(),
    };
    Desired {
        owner: OWNER.to_owned(),
        poll_interval: GoDuration::from_secs(10),
        ci: BTreeMap::from([(CiName::new("ci"), CiSourceSpec { kind: CiKind::Fake(FakeSpec::default()) })]),
        backends: BTreeMap::from([(
            BackendName::new("fake"),
            BackendSpec {
                kind: BackendKind::Fake(FakeSpec::default()),
                billing: Billing::PerSecond,
                create_limit: None,
                change_timeout: None,
            },
        )]),
        pools: vec![pool],
        images: BTreeMap::new(),
        config_hash: "test".to_owned(),
        metrics: None,
    }
}

fn providers_with(backend: Arc<dyn Backend>, world: &FakeWorld) -> Providers {
    Providers {
        backends: BTreeMap::from([(BackendName::new("fake"), backend)]),
        ci: BTreeMap::from([(CiName::new("ci"), Arc::new(world.ci()) as _)]),
    }
}

fn providers(world: &FakeWorld) -> Providers {
    providers_with(Arc::new(world.backend()), world)
}

fn plan(changes: Vec<Change>) -> Plan {
    Plan {
        format_version: ciscale::plan::FORMAT_VERSION,
        ciscale_version: "test".to_owned(),
        config_hash: "test".to_owned(),
        observed_fingerprint: "test".to_owned(),
        planned_at: "2025-01-01T10:00:00Z".parse().expect("timestamp"),
        pools: Vec::new(),
        changes,
        notes: Vec::new(),
        summary: Summary::default(),
        cost: Cost::default(),
    }
}

fn change(action: Action, instance: Option<InstanceTarget>, agent: Option<AgentTarget>) -> Change {
    Change {
        pool: PoolName::new("linux"),
        action,
        instance,
        agent,
        reason: "test".to_owned(),
        cause: None,
        before: BTreeMap::new(),
        after: BTreeMap::new(),
    }
}

fn create(name: &str) -> Change {
    let mut create = change(
        Action::Create,
        Some(InstanceTarget { backend: BackendName::new("fake"), id: None, name: name.to_owned() }),
        None,
    );
    create.after = BTreeMap::from([
        (format!("label.{OWNER_LABEL}"), OWNER.to_owned()),
        (format!("label.{POOL_LABEL}"), "linux".to_owned()),
        ("machine.server_type".to_owned(), "cx22".to_owned()),
    ]);
    create
}

fn instance(id: &InstanceId, name: &str) -> Option<InstanceTarget> {
    Some(InstanceTarget { backend: BackendName::new("fake"), id: Some(id.clone()), name: name.to_owned() })
}

fn agent(id: &AgentId, name: &str) -> Option<AgentTarget> {
    Some(AgentTarget { ci: CiName::new("ci"), id: id.clone(), name: name.to_owned() })
}

async fn run(plan: &Plan, desired: &Desired, providers: &Providers) -> ApplyReport {
    let (_cancel, cancelled) = watch::channel(false);
    apply(plan, desired, providers, &options(), &NoProgress, &cancelled).await
}

/// An instance and agent as a finished create leaves them (the agent never reached through apply).
async fn existing(world: &FakeWorld, name: &str) -> (InstanceId, AgentId) {
    let created = world.backend().create(&owned_request(OWNER, name)).await.expect("create");
    world.backend().get(&created.id).await.expect("boot");
    let request = ciscale::providers::RegisterAgent {
        name: name.to_owned(),
        pool: PoolName::new("linux"),
        labels: BTreeMap::new(),
        for_job: None,
    };
    let credential = world.ci().register(&request).await.expect("register");
    (created.id, credential.agent_id)
}

fn outcomes(report: &ApplyReport) -> Vec<&Outcome> {
    report.outcomes.iter().map(|(_, outcome)| outcome).collect()
}

/// Records every progress call, in order.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
}

impl Recorder {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("recorder").clone()
    }
}

impl Progress for Recorder {
    fn start(&self, change: &Change) {
        self.calls.lock().expect("recorder").push(format!("start {}", change.action));
    }
    fn step(&self, change: &Change, step: &str) {
        self.calls.lock().expect("recorder").push(format!("{} {}: {step}", change.action, target(change)));
    }
    fn finish(&self, change: &Change, outcome: &Outcome) {
        self.calls.lock().expect("recorder").push(format!("finish {} {}: {outcome}", change.action, target(change)));
    }
}

fn target(change: &Change) -> &str {
    change.instance.as_ref().map(|instance| instance.name.as_str()).unwrap_or("-")
}

// -- create ----------------------------------------------------------------------------------------------------

/// The credential file the fake's first agent gets from [`desired`]: written out here, not computed, so the
/// format is pinned.
const FIRST_AGENT_ENV: &str = "CISCALE_AGENT_ID=1\n\
CISCALE_AGENT_TOKEN=fake-token-1-1\n\
CI_SERVER=fake://\n\
GIT_TOKEN=s3cr3t-GIT-TOKEN-must-not-leak\n\
WOODPECKER_MAX_WORKFLOWS=1\n";

#[tokio::test]
async fn create_registers_creates_waits_pushes_the_credential_and_starts_the_agent() {
    let world = FakeWorld::new();
    let desired = desired();
    let recorder = Recorder::default();
    let (_cancel, cancelled) = watch::channel(false);
    let report =
        apply(&plan(vec![create("linux-1")]), &desired, &providers(&world), &options(), &recorder, &cancelled).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    assert!(report.is_success());

    let snapshot = world.snapshot();
    assert_eq!(snapshot.agents.len(), 1);
    let registered = &snapshot.agents[0];
    assert_eq!(registered.name, "linux-1");
    assert_eq!(registered.labels.get("platform").map(String::as_str), Some("linux/amd64"));
    assert!(!registered.labels.contains_key(EPHEMERAL_LABEL), "not an ephemeral pool");

    assert_eq!(snapshot.instances.len(), 1);
    let created = &snapshot.instances[0];
    assert_eq!(created.name, "linux-1");
    assert_eq!(created.state, InstanceState::Running);
    assert_eq!(created.labels.get(OWNER_LABEL).map(String::as_str), Some(OWNER));
    assert_eq!(created.labels.get(POOL_LABEL).map(String::as_str), Some("linux"));
    assert_eq!(created.attributes.get("server_type").map(String::as_str), Some("cx22"));
    assert_eq!(created.user_data_sha256, None, "a container gets its credential as a file, not user data");

    assert_eq!(snapshot.pushed_files.len(), 1);
    let pushed = &snapshot.pushed_files[0];
    assert_eq!(pushed.instance, created.id);
    assert_eq!(pushed.path, CREDENTIAL_PATH);
    assert_eq!(pushed.mode, 0o400);
    assert_eq!((pushed.uid, pushed.gid), (0, 0));
    assert_eq!(pushed.sha256, sha256_hex(FIRST_AGENT_ENV.as_bytes()), "credential file content");

    assert_eq!(snapshot.execs.len(), 1);
    assert_eq!(snapshot.execs[0].command, [AGENT_COMMAND]);
    assert!(!snapshot.execs[0].wait, "the agent is started fire-and-forget");

    assert_eq!(
        recorder.calls(),
        [
            "start create",
            "create linux-1: register agent",
            "create linux-1: create instance",
            "create linux-1: wait ready",
            "create linux-1: push credential",
            "create linux-1: start agent",
            "finish create linux-1: done",
        ]
    );
}

#[tokio::test]
async fn without_exec_the_credential_goes_into_user_data() {
    let world = FakeWorld::new();
    world.set_exec_capability(false);
    let report = run(&plan(vec![create("linux-1")]), &desired(), &providers(&world)).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    let snapshot = world.snapshot();
    // The env file travels inside the cloud-init that runs the agent container (the pool names no image).
    let user_data = ciscale::apply::cloud_init(None, &Secret::new(FIRST_AGENT_ENV)).expect("cloud-init");
    assert_eq!(snapshot.instances[0].user_data_sha256, Some(sha256_hex(user_data.expose().as_bytes())));
    assert!(snapshot.pushed_files.is_empty());
    assert!(snapshot.execs.is_empty());
}

/// The fake CI declaring another CI's capabilities (its launch above all), and optionally writing its own user data.
#[derive(Debug)]
struct Declaring {
    inner: ciscale::providers::fake::FakeCi,
    capabilities: ciscale::providers::CiCapabilities,
}

#[async_trait::async_trait]
impl CiSource for Declaring {
    fn kind(&self) -> &'static str {
        "declaring"
    }
    fn capabilities(&self) -> ciscale::providers::CiCapabilities {
        self.capabilities
    }
    fn cloud_user_data(&self, env_file: &Secret) -> ciscale::providers::Result<Secret> {
        Ok(Secret::new(format!("#own-user-data\n{}", env_file.expose())))
    }
    async fn observe(&self) -> ciscale::providers::Result<ciscale::model::CiObservation> {
        self.inner.observe().await
    }
    async fn register(
        &self,
        request: &ciscale::providers::RegisterAgent,
    ) -> ciscale::providers::Result<AgentCredential> {
        self.inner.register(request).await
    }
    async fn drain(&self, id: &AgentId) -> ciscale::providers::Result<()> {
        self.inner.drain(id).await
    }
    async fn undrain(&self, id: &AgentId) -> ciscale::providers::Result<()> {
        self.inner.undrain(id).await
    }
    async fn deregister(&self, id: &AgentId) -> ciscale::providers::Result<()> {
        self.inner.deregister(id).await
    }
}

/// On a cloud server the agent is what the pool's CI launches: an Azure pool boots its own image with the PAT as
/// `AZP_TOKEN` (and without an image is refused before anything is created), a Woodpecker pool without an image
/// boots Woodpecker's agent, and a source that writes its own user data (Forgejo) has it used as it is.
#[tokio::test]
async fn a_cloud_server_boots_the_agent_its_ci_launches() {
    use ciscale::providers::{azure_pipelines, forgejo, woodpecker};
    let boot = |capabilities, image: Option<&str>| {
        let world = FakeWorld::new();
        world.set_exec_capability(false);
        let mut desired = desired();
        desired.pools[0].agent.image = image.map(str::to_owned);
        let mut providers = providers(&world);
        providers.ci.insert(CiName::new("ci"), Arc::new(Declaring { inner: world.ci(), capabilities }));
        async move {
            let report = run(&plan(vec![create("linux-1")]), &desired, &providers).await;
            (world, report)
        }
    };
    let with_token_as = |name: &str| {
        let mut lines: Vec<String> = FIRST_AGENT_ENV.lines().map(str::to_owned).collect();
        lines.push(format!("{name}=fake-token-1-1"));
        lines.sort();
        lines.iter().map(|line| format!("{line}\n")).collect::<String>()
    };
    let user_data_sha = |world: &FakeWorld| world.snapshot().instances[0].user_data_sha256.clone();

    let (world, report) = boot(azure_pipelines::CAPABILITIES, Some("acme/azp-agent:4")).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    let expected = ciscale::apply::cloud_init(Some("acme/azp-agent:4"), &Secret::new(with_token_as("AZP_TOKEN")))
        .expect("cloud-init");
    assert_eq!(user_data_sha(&world), Some(sha256_hex(expected.expose().as_bytes())));

    let (world, report) = boot(azure_pipelines::CAPABILITIES, None).await;
    let [Outcome::Failed { step, error }] = outcomes(&report)[..] else { panic!("{report:?}") };
    assert_eq!(step, "write user data");
    assert!(error.contains("names no `agent.image`") && error.contains("AZP_TOKEN"), "{error}");
    assert!(world.snapshot().instances.is_empty());

    let (world, report) = boot(woodpecker::CAPABILITIES, None).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    let expected = ciscale::apply::cloud_init(
        Some("woodpeckerci/woodpecker-agent:latest"),
        &Secret::new(with_token_as("WOODPECKER_AGENT_SECRET")),
    )
    .expect("cloud-init");
    assert_eq!(user_data_sha(&world), Some(sha256_hex(expected.expose().as_bytes())));

    let (world, report) = boot(forgejo::CAPABILITIES, Some("ignored/image")).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    let own = format!("#own-user-data\n{}", with_token_as("FORGEJO_RUNNER_TOKEN"));
    assert_eq!(user_data_sha(&world), Some(sha256_hex(own.as_bytes())));
}

/// A GitHub pool, applied with the real GitHub source against the GitHub fake: the instance gets the runner's
/// just-in-time config under `ACTIONS_RUNNER_INPUT_JITCONFIG` — as a 0400 file and the wrapper started in a
/// container, or inside the source's own cloud-init (the pinned runner release) on a cloud server.
#[tokio::test]
async fn a_github_pool_hands_each_runner_its_just_in_time_config() {
    use crate::fakes::github::{FakeGithub, PAT};
    use ciscale::providers::github::{self, launch, Auth, GithubActions, GithubSettings, RunnerArch, Scope};
    for exec in [true, false] {
        let fake = FakeGithub::start();
        fake.add_repo("acme/app");
        let settings = GithubSettings {
            endpoint: fake.url(),
            owner: Some(OWNER.to_owned()),
            ..GithubSettings::new(
                Scope::Repository { owner: "acme".to_owned(), name: "app".to_owned() },
                Auth::Token(Secret::new(PAT)),
            )
        };
        let source = Arc::new(GithubActions::new(settings).expect("source"));
        let world = FakeWorld::new();
        world.set_exec_capability(exec);
        let mut desired = desired();
        desired.pools[0].ci.labels =
            BTreeMap::from([("self-hosted".to_owned(), String::new()), ("gpu".to_owned(), String::new())]);
        desired.pools[0].agent.env.clear();
        desired.pools[0].agent.secret_env.clear();
        let mut providers = providers(&world);
        providers.ci.insert(CiName::new("ci"), source);
        let report = run(&plan(vec![create("linux-1")]), &desired, &providers).await;
        assert_eq!(outcomes(&report), [&Outcome::Done], "exec: {exec}");

        let runner = fake.runner_by_name("linux-1").expect("a runner of the instance's name");
        assert_eq!(runner.labels, ["self-hosted", "Linux", "X64", "gpu", &github::owner_label(OWNER)]);
        let jit = runner.jit_config.expect("a just-in-time runner");
        let env_file =
            format!("{}={jit}\nCISCALE_AGENT_ID={}\nCISCALE_AGENT_TOKEN={jit}\n", launch::JIT_CONFIG_ENV, runner.id);
        let snapshot = world.snapshot();
        if exec {
            assert_eq!(snapshot.pushed_files.len(), 1);
            assert_eq!(
                (snapshot.pushed_files[0].path.as_str(), snapshot.pushed_files[0].mode),
                (CREDENTIAL_PATH, 0o400)
            );
            assert_eq!(snapshot.pushed_files[0].sha256, sha256_hex(env_file.as_bytes()));
            assert_eq!(snapshot.execs[0].command, [AGENT_COMMAND]);
            assert_eq!(snapshot.instances[0].user_data_sha256, None);
        } else {
            let release = launch::RunnerRelease::for_arch(RunnerArch::X64).expect("x64");
            let expected = launch::cloud_user_data(release, &Secret::new(env_file)).expect("user data");
            assert_eq!(snapshot.instances[0].user_data_sha256, Some(sha256_hex(expected.expose().as_bytes())));
            assert!(snapshot.pushed_files.is_empty() && snapshot.execs.is_empty());
        }
        assert!(fake.spec_violations().is_empty(), "{:?}", fake.spec_violations());
    }
}

#[tokio::test]
async fn an_ephemeral_pool_registers_ephemeral_agents() {
    let world = FakeWorld::new();
    let mut desired = desired();
    desired.pools[0].scale.ephemeral = true;
    let report = run(&plan(vec![create("linux-1")]), &desired, &providers(&world)).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    assert_eq!(world.snapshot().agents[0].labels.get(EPHEMERAL_LABEL).map(String::as_str), Some("true"));
}

#[tokio::test]
async fn create_adds_the_owner_labels_the_plan_left_out() {
    let world = FakeWorld::new();
    let mut bare = create("linux-1");
    bare.after.retain(|key, _| key.starts_with("machine."));
    let report = run(&plan(vec![bare]), &desired(), &providers(&world)).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    let labels = &world.snapshot().instances[0].labels;
    assert_eq!(labels.get(OWNER_LABEL).map(String::as_str), Some(OWNER));
    assert_eq!(labels.get(POOL_LABEL).map(String::as_str), Some("linux"));
}

#[tokio::test]
async fn a_plan_for_another_owner_creates_nothing() {
    let world = FakeWorld::new();
    let mut foreign = create("linux-1");
    foreign.after.insert(format!("label.{OWNER_LABEL}"), "someone-else".to_owned());
    let report = run(&plan(vec![foreign]), &desired(), &providers(&world)).await;
    let [Outcome::Failed { step, error }] = outcomes(&report)[..] else { panic!("{report:?}") };
    assert_eq!(step, "resolve");
    assert!(error.contains("someone-else"), "{error}");
    assert!(world.snapshot().instances.is_empty());
}

// -- scale-down and the other actions ---------------------------------------------------------------------------

#[tokio::test]
async fn drain_then_delete_removes_the_instance_and_deregisters_the_agent() {
    let world = FakeWorld::new();
    let (instance_id, agent_id) = existing(&world, "linux-1").await;
    let (kept_instance, kept_agent) = existing(&world, "linux-2").await;
    let changes = vec![
        change(Action::Drain, instance(&instance_id, "linux-1"), agent(&agent_id, "linux-1")),
        change(Action::Delete, instance(&instance_id, "linux-1"), agent(&agent_id, "linux-1")),
    ];
    let report = run(&plan(changes), &desired(), &providers(&world)).await;
    assert_eq!(outcomes(&report), [&Outcome::Done, &Outcome::Done]);
    let snapshot = world.snapshot();
    assert_eq!(snapshot.instances.iter().map(|instance| &instance.id).collect::<Vec<_>>(), [&kept_instance]);
    assert_eq!(snapshot.agents.iter().map(|agent| &agent.id).collect::<Vec<_>>(), [&kept_agent]);
    assert_eq!(world.calls(Op::Drain), 1);
    assert_eq!(world.calls(Op::Deregister), 1);
}

#[tokio::test]
async fn delete_and_deregister_of_what_is_gone_are_done() {
    let world = FakeWorld::new();
    let gone_instance = InstanceId::new("fake-99");
    let gone_agent = AgentId::new("99");
    let changes = vec![
        change(Action::Delete, instance(&gone_instance, "linux-9"), agent(&gone_agent, "linux-9")),
        change(Action::Deregister, None, agent(&AgentId::new("98"), "linux-8")),
    ];
    let report = run(&plan(changes), &desired(), &providers(&world)).await;
    assert_eq!(outcomes(&report), [&Outcome::Done, &Outcome::Done]);
    assert_eq!(world.calls(Op::Delete), 0, "a missing instance is not deleted");
    assert_eq!(world.calls(Op::Deregister), 2);
}

#[tokio::test]
async fn delete_refuses_an_instance_it_does_not_own() {
    let world = FakeWorld::new();
    let foreign = world.backend().create(&owned_request("someone-else", "linux-1")).await.expect("create");
    let changes = vec![change(Action::Delete, instance(&foreign.id, "linux-1"), None)];
    let report = run(&plan(changes), &desired(), &providers(&world)).await;
    let [Outcome::Failed { step, error }] = outcomes(&report)[..] else { panic!("{report:?}") };
    assert_eq!(step, "check owner");
    assert!(error.contains("refusing to delete"), "{error}");
    assert_eq!(world.snapshot().instances.len(), 1, "the foreign instance is untouched");
    assert_eq!(world.calls(Op::Delete), 0);
}

#[tokio::test]
async fn stop_then_start_undrains_the_agent() {
    let world = FakeWorld::new();
    let (instance_id, agent_id) = existing(&world, "linux-1").await;
    world.ci().drain(&agent_id).await.expect("drain");
    let stop = change(Action::Stop, instance(&instance_id, "linux-1"), agent(&agent_id, "linux-1"));
    let report = run(&plan(vec![stop]), &desired(), &providers(&world)).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    assert_eq!(world.snapshot().instances[0].state, InstanceState::Stopped);

    let start = change(Action::Start, instance(&instance_id, "linux-1"), agent(&agent_id, "linux-1"));
    let report = run(&plan(vec![start]), &desired(), &providers(&world)).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    let snapshot = world.snapshot();
    assert_eq!(snapshot.instances[0].state, InstanceState::Running);
    assert!(!snapshot.agents[0].no_schedule, "a started agent takes jobs again");
}

#[tokio::test]
async fn replace_deletes_then_creates_with_the_current_spec() {
    let world = FakeWorld::new();
    let (old_instance, old_agent) = existing(&world, "linux-1").await;
    let mut replace = change(Action::Replace, instance(&old_instance, "linux-1"), agent(&old_agent, "linux-1"));
    replace.after = create("linux-1").after;
    replace.after.insert("machine.server_type".to_owned(), "cx32".to_owned());
    let report = run(&plan(vec![replace]), &desired(), &providers(&world)).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    let snapshot = world.snapshot();
    assert_eq!(snapshot.instances.len(), 1);
    assert_ne!(snapshot.instances[0].id, old_instance);
    assert_eq!(snapshot.instances[0].attributes.get("server_type").map(String::as_str), Some("cx32"));
    assert_eq!(snapshot.agents.len(), 1);
    assert_ne!(snapshot.agents[0].id, old_agent, "the old agent record went, a new one came");
    assert_eq!(snapshot.pushed_files.len(), 1);
}

// -- failures ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_failed_change_fails_alone_and_blocks_only_later_changes_on_its_target() {
    let world = FakeWorld::new();
    let (instance_id, _) = existing(&world, "linux-1").await;
    let missing_agent = AgentId::new("404");
    let mut unknown_backend = create("linux-3");
    if let Some(target) = &mut unknown_backend.instance {
        target.backend = BackendName::new("nowhere");
    }
    let mut unknown_pool = create("linux-4");
    unknown_pool.pool = PoolName::new("gone");
    let changes = vec![
        // Draining an agent the CI does not know fails ...
        change(Action::Drain, instance(&instance_id, "linux-1"), agent(&missing_agent, "linux-1")),
        // ... so the delete planned after it must not run.
        change(Action::Delete, instance(&instance_id, "linux-1"), agent(&missing_agent, "linux-1")),
        create("linux-2"),
        unknown_backend,
        unknown_pool,
    ];
    let report = run(&plan(changes), &desired(), &providers(&world)).await;
    let outcomes = outcomes(&report);
    assert!(matches!(outcomes[0], Outcome::Failed { step, .. } if step == "drain agent"), "{:?}", outcomes[0]);
    assert!(matches!(outcomes[1], Outcome::Skipped { why } if why.contains("drain")), "{:?}", outcomes[1]);
    assert_eq!(outcomes[2], &Outcome::Done);
    assert!(
        matches!(outcomes[3], Outcome::Failed { step, error } if step == "resolve" && error.contains("`nowhere`")),
        "{:?}",
        outcomes[3]
    );
    assert!(
        matches!(outcomes[4], Outcome::Failed { step, error } if step == "resolve" && error.contains("`gone`")),
        "{:?}",
        outcomes[4]
    );
    assert_eq!((report.succeeded(), report.failed(), report.skipped()), (1, 3, 1));
    assert!(world.snapshot().instances.iter().any(|instance| instance.id == instance_id), "not deleted");
}

#[tokio::test]
async fn transient_faults_are_retried() {
    let world = FakeWorld::new();
    world.inject(Fault::new(Op::Register, FaultKind::RateLimited { retry_after: Some(Duration::from_millis(1)) }, 1));
    world.inject(Fault::new(Op::Create, FaultKind::Unavailable5xx, 2));
    world.inject(Fault::new(Op::PushFile, FaultKind::Timeout, 3));
    let report = run(&plan(vec![create("linux-1")]), &desired(), &providers(&world)).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    assert_eq!(world.calls(Op::Register), 2);
    assert_eq!(world.calls(Op::Create), 3);
    assert_eq!(world.calls(Op::PushFile), 4);
    assert_eq!(world.snapshot().instances.len(), 1);
}

#[tokio::test]
async fn retries_stop_after_three() {
    let world = FakeWorld::new();
    world.inject(Fault::new(Op::Create, FaultKind::Unavailable5xx, 10));
    let report = run(&plan(vec![create("linux-1")]), &desired(), &providers(&world)).await;
    let [Outcome::Failed { step, error }] = outcomes(&report)[..] else { panic!("{report:?}") };
    assert_eq!(step, "create instance");
    assert!(error.contains("unavailable"), "{error}");
    assert_eq!(world.calls(Op::Create), 4, "one attempt and three retries");
}

#[tokio::test]
async fn capacity_and_auth_errors_are_not_retried() {
    for kind in [FaultKind::Capacity, FaultKind::Unauthenticated] {
        let world = FakeWorld::new();
        world.inject(Fault::new(Op::Create, kind.clone(), 1));
        let report = run(&plan(vec![create("linux-1")]), &desired(), &providers(&world)).await;
        assert_eq!(report.failed(), 1, "{kind:?}");
        assert_eq!(world.calls(Op::Create), 1, "{kind:?} is not retried");
    }
}

#[tokio::test]
async fn waiting_for_an_instance_that_never_runs_times_out() {
    let world = FakeWorld::new();
    world.inject(Fault::new(Op::Get, FaultKind::Unavailable5xx, u32::MAX));
    let (_cancel, cancelled) = watch::channel(false);
    let options = ApplyOptions { ready_timeout: Duration::from_millis(20), ..options() };
    let report =
        apply(&plan(vec![create("linux-1")]), &desired(), &providers(&world), &options, &NoProgress, &cancelled).await;
    let [Outcome::Failed { step, error }] = outcomes(&report)[..] else { panic!("{report:?}") };
    assert_eq!(step, "wait ready");
    assert!(error.contains("not running after"), "{error}");
    assert!(world.snapshot().pushed_files.is_empty(), "no credential for an instance that is not up");
}

// -- crash recovery ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_create_whose_response_was_lost_converges_without_duplicates() {
    let world = FakeWorld::new();
    world.inject(Fault::new(Op::Create, FaultKind::LostResponse, 1));
    let report = run(&plan(vec![create("linux-1")]), &desired(), &providers(&world)).await;
    assert_eq!(outcomes(&report), [&Outcome::Done]);
    let snapshot = world.snapshot();
    assert_eq!(snapshot.instances.len(), 1, "the retry found the instance the lost response had created");
    assert_eq!(snapshot.pushed_files.len(), 1);
    assert_eq!(snapshot.pushed_files[0].instance, snapshot.instances[0].id);
}

#[tokio::test]
async fn a_create_run_again_after_a_crash_converges() {
    let world = FakeWorld::new();
    // The first run died after the instance was created: the credential was never pushed.
    world.inject(Fault::new(Op::PushFile, FaultKind::Unauthenticated, 1));
    let first = run(&plan(vec![create("linux-1")]), &desired(), &providers(&world)).await;
    assert_eq!(first.failed(), 1);
    assert_eq!(world.snapshot().instances.len(), 1);

    let second = run(&plan(vec![create("linux-1")]), &desired(), &providers(&world)).await;
    assert_eq!(outcomes(&second), [&Outcome::Done]);
    let snapshot = world.snapshot();
    assert_eq!(snapshot.instances.len(), 1, "no duplicate instance");
    assert_eq!(snapshot.agents.len(), 1, "no duplicate agent");
    assert_eq!(snapshot.pushed_files.len(), 1);
    // The fresh token from the second registration is the one pushed.
    let token = "fake-token-1-2";
    assert_eq!(snapshot.agents[0].token_sha256, sha256_hex(token.as_bytes()));
    assert_eq!(
        snapshot.pushed_files[0].sha256,
        sha256_hex(FIRST_AGENT_ENV.replace("fake-token-1-1", token).as_bytes())
    );
}

#[tokio::test]
async fn create_never_takes_over_an_instance_it_does_not_own() {
    let world = FakeWorld::new();
    world.backend().create(&owned_request("someone-else", "linux-1")).await.expect("foreign create");
    let report = run(&plan(vec![create("linux-1")]), &desired(), &providers(&world)).await;
    let [Outcome::Failed { step, error }] = outcomes(&report)[..] else { panic!("{report:?}") };
    assert_eq!(step, "create instance");
    assert!(error.contains("not labelled `ciscale.owner=apply-tests`"), "{error}");
    let snapshot = world.snapshot();
    assert!(snapshot.pushed_files.is_empty() && snapshot.execs.is_empty(), "nothing pushed into it");
}

// -- cancel and concurrency -------------------------------------------------------------------------------------

#[tokio::test]
async fn a_cancelled_apply_starts_nothing() {
    let world = FakeWorld::new();
    let (cancel, cancelled) = watch::channel(false);
    cancel.send_replace(true);
    let report = apply(
        &plan(vec![create("linux-1"), create("linux-2")]),
        &desired(),
        &providers(&world),
        &options(),
        &NoProgress,
        &cancelled,
    )
    .await;
    assert_eq!(report.skipped(), 2);
    assert!(world.snapshot().calls.is_empty(), "no provider was called");
}

/// Cancels the apply as soon as the first change starts.
struct CancelOnFirstStart {
    cancel: watch::Sender<bool>,
}

impl Progress for CancelOnFirstStart {
    fn start(&self, _change: &Change) {
        self.cancel.send_replace(true);
    }
    fn step(&self, _change: &Change, _step: &str) {}
    fn finish(&self, _change: &Change, _outcome: &Outcome) {}
}

#[tokio::test]
async fn cancel_lets_the_change_in_flight_finish_and_starts_no_other() {
    let world = FakeWorld::new();
    // Keeps the first change busy (polling for readiness) long enough for the cancel to be seen.
    world.inject(Fault::new(Op::Get, FaultKind::Unavailable5xx, 5));
    let (cancel, cancelled) = watch::channel(false);
    let progress = CancelOnFirstStart { cancel };
    let options = ApplyOptions { concurrency: 1, ..options() };
    let report = apply(
        &plan(vec![create("linux-1"), create("linux-2"), create("linux-3")]),
        &desired(),
        &providers(&world),
        &options,
        &progress,
        &cancelled,
    )
    .await;
    assert_eq!(outcomes(&report)[0], &Outcome::Done, "the change in flight finished");
    assert_eq!(report.skipped(), 2, "{report:?}");
    assert!(report
        .outcomes
        .iter()
        .skip(1)
        .all(|(_, outcome)| matches!(outcome, Outcome::Skipped { why } if why.contains("cancelled"))));
    assert_eq!(world.snapshot().instances.len(), 1);
}

/// The fake backend, with a gate in `create` that measures how many creates run at once and, with a barrier,
/// proves that they do.
#[derive(Debug)]
struct Gated {
    inner: FakeBackend,
    barrier: Option<Arc<tokio::sync::Barrier>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl Gated {
    fn new(world: &FakeWorld, barrier: Option<usize>) -> Self {
        Self {
            inner: world.backend(),
            barrier: barrier.map(|parties| Arc::new(tokio::sync::Barrier::new(parties))),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        }
    }
}

#[async_trait::async_trait]
impl Backend for Gated {
    fn kind(&self) -> &'static str {
        "gated"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn observe(&self, request: &ListInstances) -> ciscale::providers::Result<BackendObservation> {
        self.inner.observe(request).await
    }
    async fn create(&self, request: &CreateInstance) -> ciscale::providers::Result<Instance> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        match &self.barrier {
            Some(barrier) => {
                barrier.wait().await;
            }
            None => {
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
            }
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.inner.create(request).await
    }
    async fn get(&self, id: &InstanceId) -> ciscale::providers::Result<Instance> {
        self.inner.get(id).await
    }
    async fn start(&self, id: &InstanceId) -> ciscale::providers::Result<()> {
        self.inner.start(id).await
    }
    async fn stop(&self, id: &InstanceId) -> ciscale::providers::Result<()> {
        self.inner.stop(id).await
    }
    async fn delete(&self, id: &InstanceId) -> ciscale::providers::Result<()> {
        self.inner.delete(id).await
    }
    async fn push_file(&self, id: &InstanceId, file: &PushFile) -> ciscale::providers::Result<()> {
        self.inner.push_file(id, file).await
    }
    async fn exec(&self, id: &InstanceId, exec: &Exec) -> ciscale::providers::Result<ExecOutput> {
        self.inner.exec(id, exec).await
    }
}

#[tokio::test]
async fn changes_on_different_targets_run_concurrently() {
    let world = FakeWorld::new();
    // Three creates must all be inside `create` at once for the barrier to open.
    let gated = Arc::new(Gated::new(&world, Some(3)));
    let providers = providers_with(gated.clone(), &world);
    let changes = vec![create("linux-1"), create("linux-2"), create("linux-3")];
    let (_cancel, cancelled) = watch::channel(false);
    let options = ApplyOptions { concurrency: 3, ..options() };
    // The timeout only turns a (buggy) deadlock into a failure instead of a hung test.
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        apply(&plan(changes), &desired(), &providers, &options, &NoProgress, &cancelled),
    )
    .await
    .expect("the creates ran concurrently (otherwise the barrier never opens)");
    assert_eq!(report.succeeded(), 3);
    assert_eq!(gated.most_in_flight.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn concurrency_is_capped() {
    let world = FakeWorld::new();
    let gated = Arc::new(Gated::new(&world, None));
    let providers = providers_with(gated.clone(), &world);
    let changes = (1..=6).map(|index| create(&format!("linux-{index}"))).collect();
    let (_cancel, cancelled) = watch::channel(false);
    let options = ApplyOptions { concurrency: 2, ..options() };
    let report = apply(&plan(changes), &desired(), &providers, &options, &NoProgress, &cancelled).await;
    assert_eq!(report.succeeded(), 6);
    assert_eq!(gated.most_in_flight.load(Ordering::SeqCst), 2, "never more than 2 creates at once, and 2 do overlap");
    assert_eq!(world.snapshot().instances.len(), 6);
}

// -- secrets ----------------------------------------------------------------------------------------------------

/// A backend whose errors echo what it was sent (as careless APIs do): the executor must redact them.
#[derive(Debug)]
struct Echoing(FakeBackend);

#[async_trait::async_trait]
impl Backend for Echoing {
    fn kind(&self) -> &'static str {
        "echoing"
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    async fn observe(&self, request: &ListInstances) -> ciscale::providers::Result<BackendObservation> {
        self.0.observe(request).await
    }
    async fn create(&self, request: &CreateInstance) -> ciscale::providers::Result<Instance> {
        self.0.create(request).await
    }
    async fn get(&self, id: &InstanceId) -> ciscale::providers::Result<Instance> {
        self.0.get(id).await
    }
    async fn start(&self, id: &InstanceId) -> ciscale::providers::Result<()> {
        self.0.start(id).await
    }
    async fn stop(&self, id: &InstanceId) -> ciscale::providers::Result<()> {
        self.0.stop(id).await
    }
    async fn delete(&self, id: &InstanceId) -> ciscale::providers::Result<()> {
        self.0.delete(id).await
    }
    async fn push_file(&self, _id: &InstanceId, file: &PushFile) -> ciscale::providers::Result<()> {
        Err(Error::Invalid { provider: "echoing".to_owned(), message: format!("bad file: {}", file.content.expose()) })
    }
}

/// A `MakeWriter` into a shared buffer, to read what was logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'writer> tracing_subscriber::fmt::MakeWriter<'writer> for Captured {
    type Writer = Captured;
    fn make_writer(&'writer self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn secrets_never_reach_outcomes_progress_or_logs() {
    let world = FakeWorld::new();
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    // `#[tokio::test]` runs every task on this thread, so the thread's default subscriber sees them all.
    let _guard = tracing::subscriber::set_default(subscriber);

    // One create succeeds, one fails with an error that echoes the whole credential file.
    let echoing = FakeWorld::new();
    let recorder = Recorder::default();
    let (_cancel, cancelled) = watch::channel(false);
    let desired = desired();
    let good =
        apply(&plan(vec![create("linux-1")]), &desired, &providers(&world), &options(), &recorder, &cancelled).await;
    let bad = apply(
        &plan(vec![create("linux-2")]),
        &desired,
        &providers_with(Arc::new(Echoing(echoing.backend())), &echoing),
        &options(),
        &recorder,
        &cancelled,
    )
    .await;
    assert_eq!(good.succeeded(), 1);
    let [Outcome::Failed { step, error }] = outcomes(&bad)[..] else { panic!("{bad:?}") };
    assert_eq!(step, "push credential");
    assert!(error.contains("bad file") && error.contains("GIT_TOKEN=***"), "redacted, not dropped: {error}");

    let logged = String::from_utf8_lossy(&logs.0.lock().expect("logs")).into_owned();
    assert!(logged.contains("push credential"), "the log was captured: {logged}");
    let texts = [
        logged,
        format!("{good:?} {bad:?}"),
        bad.outcomes.iter().map(|(_, outcome)| outcome.to_string()).collect::<Vec<_>>().join("\n"),
        recorder.calls().join("\n"),
    ];
    for text in texts {
        assert!(!text.contains(SECRET), "secret_env leaked: {text}");
        assert!(!text.contains("fake-token-"), "an agent token leaked: {text}");
    }
}

/// Every provider kind with a token of its own (each recognisable), for the redaction test. The `match`es have no
/// `_` arm: adding a kind breaks this until its secrets are listed here too.
fn every_kind_with_tokens() -> (Vec<CiKind>, Vec<BackendKind>, Vec<&'static str>) {
    let ci = vec![
        CiKind::Woodpecker {
            server: "http://woodpecker.invalid".to_owned(),
            token: Secret::new("tok-WOODPECKER-api"),
            grpc_address: None,
        },
        CiKind::AzurePipelines {
            organization_url: "https://dev.azure.invalid/acme".to_owned(),
            pat: Secret::new("tok-AZURE-pat"),
            agent_pat: Some(Secret::new("tok-AZURE-agent-pat")),
        },
        CiKind::Github(GithubSpec {
            endpoint: None,
            scope: GithubScope::Organization("acme".to_owned()),
            auth: GithubAuth::App {
                app_id: "1".to_owned(),
                installation_id: 2,
                private_key: Secret::new("tok-GITHUB-app-private-key"),
            },
            runner_group: None,
            repositories: None,
            repositories_per_cycle: None,
            webhook_secret: None,
            arm64: false,
        }),
        CiKind::Github(GithubSpec {
            endpoint: None,
            scope: GithubScope::Repository("acme/app".to_owned()),
            auth: GithubAuth::Token(Secret::new("tok-GITHUB-pat")),
            runner_group: None,
            repositories: None,
            repositories_per_cycle: None,
            webhook_secret: Some(Secret::new("tok-GITHUB-webhook-secret")),
            arm64: true,
        }),
        CiKind::Forgejo {
            server: "http://forgejo.invalid".to_owned(),
            token: Secret::new("tok-FORGEJO-access"),
            scope: ciscale::model::ForgejoScope::Instance,
            runner_url: None,
            runner_release: None,
        },
        CiKind::Fake(FakeSpec::default()),
    ];
    let backends = vec![
        BackendKind::Hcloud { token: Secret::new("tok-HCLOUD-api"), endpoint: None },
        BackendKind::Aws { region: None, endpoint: None },
        BackendKind::Incus { socket: None, project: None },
        BackendKind::Fake(FakeSpec::default()),
    ];
    let mut tokens = Vec::new();
    for kind in &ci {
        match kind {
            CiKind::Woodpecker { .. } => tokens.push("tok-WOODPECKER-api"),
            CiKind::AzurePipelines { .. } => tokens.extend(["tok-AZURE-pat", "tok-AZURE-agent-pat"]),
            CiKind::Github(GithubSpec { auth: GithubAuth::App { .. }, .. }) => {
                tokens.push("tok-GITHUB-app-private-key")
            }
            CiKind::Github(GithubSpec { auth: GithubAuth::Token(_), .. }) => {
                tokens.extend(["tok-GITHUB-pat", "tok-GITHUB-webhook-secret"]);
            }
            CiKind::Forgejo { .. } => tokens.push("tok-FORGEJO-access"),
            CiKind::Fake(_) => {}
        }
    }
    for kind in &backends {
        match kind {
            BackendKind::Hcloud { .. } => tokens.push("tok-HCLOUD-api"),
            BackendKind::Aws { .. } | BackendKind::Incus { .. } | BackendKind::Fake(_) => {}
        }
    }
    (ci, backends, tokens)
}

/// A provider that answers every call with an error quoting every secret it could have been sent.
#[derive(Debug)]
struct Leaky(String);

impl Leaky {
    fn error(&self, extra: &str) -> Error {
        let echoed = format!("server said: {} {extra}", self.0);
        Error::Other { provider: "leaky".to_owned(), source: Box::new(std::io::Error::other(echoed)) }
    }
}

#[async_trait::async_trait]
impl Backend for Leaky {
    fn kind(&self) -> &'static str {
        "leaky"
    }
    async fn observe(&self, _request: &ListInstances) -> ciscale::providers::Result<BackendObservation> {
        Err(Error::Unauthenticated { provider: "leaky".to_owned(), message: self.0.clone() })
    }
    async fn create(&self, request: &CreateInstance) -> ciscale::providers::Result<Instance> {
        Err(self.error(request.user_data.as_ref().map(Secret::expose).unwrap_or_default()))
    }
    async fn get(&self, _id: &InstanceId) -> ciscale::providers::Result<Instance> {
        Err(self.error(""))
    }
    async fn start(&self, _id: &InstanceId) -> ciscale::providers::Result<()> {
        Err(self.error(""))
    }
    async fn stop(&self, _id: &InstanceId) -> ciscale::providers::Result<()> {
        Err(self.error(""))
    }
    async fn delete(&self, _id: &InstanceId) -> ciscale::providers::Result<()> {
        Err(self.error(""))
    }
}

#[async_trait::async_trait]
impl CiSource for Leaky {
    fn kind(&self) -> &'static str {
        "leaky"
    }
    async fn observe(&self) -> ciscale::providers::Result<ciscale::model::CiObservation> {
        Err(self.error(""))
    }
    async fn register(
        &self,
        _request: &ciscale::providers::RegisterAgent,
    ) -> ciscale::providers::Result<AgentCredential> {
        Err(Error::Invalid { provider: "leaky".to_owned(), message: self.0.clone() })
    }
    async fn drain(&self, _id: &AgentId) -> ciscale::providers::Result<()> {
        Err(self.error(""))
    }
    async fn undrain(&self, _id: &AgentId) -> ciscale::providers::Result<()> {
        Err(self.error(""))
    }
    async fn deregister(&self, _id: &AgentId) -> ciscale::providers::Result<()> {
        Err(self.error(""))
    }
}

/// Every secret of every provider kind, the pools' `secret_env` and the agents' fresh tokens, echoed back by
/// providers that fail: none reaches the observation error `plan`/`apply`/`watch` show, the apply outcomes, the
/// watch cycle report or the log.
#[tokio::test]
async fn a_token_of_every_provider_kind_never_reaches_plan_apply_watch_or_logs() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (ci_kinds, backend_kinds, tokens) = every_kind_with_tokens();
    let mut desired = desired();
    for (index, kind) in ci_kinds.into_iter().enumerate() {
        desired.ci.insert(CiName::new(format!("ci-{index}")), CiSourceSpec { kind });
    }
    for (index, kind) in backend_kinds.into_iter().enumerate() {
        let spec = BackendSpec { kind, billing: Billing::PerSecond, create_limit: None, change_timeout: None };
        desired.backends.insert(BackendName::new(format!("be-{index}")), spec);
    }
    let everything = format!("{} {SECRET}", tokens.join(" "));
    let world = FakeWorld::new();
    let leaky = Arc::new(Leaky(everything.clone()));
    let mut providers = providers(&world);
    for name in desired.ci.keys().filter(|name| name.as_str() != "ci") {
        providers.ci.insert(name.clone(), leaky.clone());
    }
    for name in desired.backends.keys().filter(|name| name.as_str() != "fake") {
        providers.backends.insert(name.clone(), leaky.clone());
    }

    // The observation (what `plan`, `apply` and `observe` print when it fails) and a watch cycle.
    let observe_error = ciscale::observe::observe(&desired, &providers, jiff::Timestamp::now())
        .await
        .expect_err("every leaky provider fails");
    let observe_text = format!("{observe_error} {observe_error:?} {}", {
        let mut chain = String::new();
        let mut cause: Option<&dyn std::error::Error> = Some(&observe_error);
        while let Some(error) = cause {
            chain.push_str(&error.to_string());
            cause = error.source();
        }
        chain
    });
    assert!(observe_text.contains("server said: ***"), "redacted, not dropped: {observe_text}");
    let (_cancel, cancelled) = watch::channel(false);
    let mut reports = Vec::new();
    let watch_options = ciscale::watch::WatchOptions { cycles: Some(1), ..Default::default() };
    ciscale::watch::run(&desired, &providers, &watch_options, &cancelled, |report| reports.push(format!("{report:?}")))
        .await;
    assert_eq!(reports.len(), 1);
    assert!(reports[0].contains("***"), "the cycle failed on the leaky providers: {}", reports[0]);

    // An apply whose create (cloud user data: the agent's fresh token and the secret env) is echoed back.
    let mut apply_providers = providers_with(leaky.clone(), &world);
    apply_providers.ci.insert(CiName::new("ci-0"), leaky.clone());
    let report =
        apply(&plan(vec![create("linux-1")]), &desired, &apply_providers, &options(), &NoProgress, &cancelled).await;
    let [Outcome::Failed { step, error }] = outcomes(&report)[..] else { panic!("{report:?}") };
    assert_eq!(step, "create instance");
    assert!(error.contains("server said: ***"), "{error}");
    assert_eq!(world.snapshot().agents.len(), 1, "an agent was registered, with a fresh token (`fake-token-…`)");

    let logged = String::from_utf8_lossy(&logs.0.lock().expect("logs")).into_owned();
    assert!(logged.contains("create instance"), "the log was captured: {logged}");
    for text in [observe_text, reports.join("\n"), format!("{report:?}"), logged] {
        for token in tokens.iter().copied().chain([SECRET, "fake-token-"]) {
            assert!(!text.contains(token), "`{token}` leaked: {text}");
        }
    }
}

// -- building blocks --------------------------------------------------------------------------------------------

#[test]
fn bootstrap_env_refuses_what_an_env_file_cannot_hold_without_showing_it() {
    let credential = AgentCredential { agent_id: AgentId::new("1"), token: Secret::new("tok"), env: BTreeMap::new() };
    let spec = |key: &str, value: &str| AgentSpec {
        image: None,
        env: BTreeMap::new(),
        secret_env: BTreeMap::from([(key.to_owned(), Secret::new(value))]),
        preregistered: None,
    };
    let error = bootstrap_env(&spec("MULTI", "line1\nline2-secret"), &credential).expect_err("line break");
    assert!(error.to_string().contains("`MULTI`") && !error.to_string().contains("secret"), "{error}");
    let error = bootstrap_env(&spec("1BAD", "x"), &credential).expect_err("bad key");
    assert!(error.to_string().contains("`1BAD`"), "{error}");
    // A secret overrides a plain value of the same key; nothing overrides the token.
    let mut overriding = spec("A", "secret");
    overriding.env.insert("A".to_owned(), "plain".to_owned());
    overriding.secret_env.insert("CISCALE_AGENT_TOKEN".to_owned(), Secret::new("forged"));
    let text = bootstrap_env(&overriding, &credential).expect("valid");
    assert_eq!(text.expose(), "A=secret\nCISCALE_AGENT_ID=1\nCISCALE_AGENT_TOKEN=tok\n");
}

#[test]
fn backoff_doubles_and_honours_retry_after_up_to_a_cap() {
    use ciscale::apply::retry::{backoff, MAX_RETRY_AFTER};
    let base = Duration::from_millis(100);
    let unavailable = Error::Unavailable { provider: "p".to_owned(), message: "m".to_owned() };
    let delays: Vec<_> = (0..3).map(|retry| backoff(base, retry, &unavailable)).collect();
    assert_eq!(delays, [Duration::from_millis(100), Duration::from_millis(200), Duration::from_millis(400)]);
    let limited = |after| Error::RateLimited { provider: "p".to_owned(), retry_after: Some(after) };
    assert_eq!(backoff(base, 0, &limited(Duration::from_secs(3))), Duration::from_secs(3));
    assert_eq!(backoff(base, 0, &limited(Duration::from_secs(3600))), MAX_RETRY_AFTER);
    // A rate limit that does not say how long: never the quick retry a 5xx gets.
    let unsaid = Error::RateLimited { provider: "p".to_owned(), retry_after: None };
    let delays: Vec<_> = (0..3).map(|retry| backoff(base, retry, &unsaid)).collect();
    assert_eq!(delays, [Duration::from_secs(1); 3]);
}

/// Picus mode: the pool's one agent was registered by hand. A create must not register another, and must undrain
/// it once the instance runs; a delete must keep its record.
#[tokio::test]
async fn preregistered_agent_is_undrained_on_create_and_kept_on_delete() {
    let world = FakeWorld::new();
    let request = ciscale::providers::RegisterAgent {
        name: "picus-agent".to_owned(),
        pool: PoolName::new("linux"),
        labels: BTreeMap::new(),
        for_job: None,
    };
    let registered = world.ci().register(&request).await.expect("register by hand");
    world.ci().drain(&registered.agent_id).await.expect("drained after its last server");
    let mut desired = desired();
    desired.pools[0].agent.preregistered = Some(ciscale::model::AgentRef::Id(registered.agent_id.clone()));
    let providers = providers(&world);
    let registrations_before = world.calls(Op::Register);

    let mut create = create("picus-linux-1");
    create.agent = agent(&registered.agent_id, "picus-agent");
    let report = run(&plan(vec![create]), &desired, &providers).await;
    assert_eq!(report.failed(), 0, "{:?}", report.outcomes);
    assert_eq!(world.calls(Op::Register), registrations_before, "no second registration");
    let state = world.snapshot();
    assert_eq!(state.agents.len(), 1, "{:?}", state.agents);
    assert!(!state.agents[0].no_schedule, "undrained after the create");
    let created = state.instances.iter().find(|i| i.name == "picus-linux-1").expect("instance created");

    let delete =
        change(Action::Delete, instance(&created.id, "picus-linux-1"), agent(&registered.agent_id, "picus-agent"));
    let report = run(&plan(vec![delete]), &desired, &providers).await;
    assert_eq!(report.failed(), 0, "{:?}", report.outcomes);
    assert_eq!(world.calls(Op::Deregister), 0, "the pre-registered agent outlives its instance");
    assert_eq!(world.snapshot().agents.len(), 1);
}

#[tokio::test]
async fn create_fails_clearly_when_the_preregistered_agent_is_missing() {
    let world = FakeWorld::new();
    let mut desired = desired();
    desired.pools[0].agent.preregistered = Some(ciscale::model::AgentRef::Name("gone-agent".to_owned()));
    let report = run(&plan(vec![create("picus-linux-1")]), &desired, &providers(&world)).await;
    assert_eq!(report.failed(), 1);
    let text = format!("{:?}", report.outcomes[0].1);
    assert!(text.contains("pre-registered agent named `gone-agent`"), "{text}");
    assert!(world.snapshot().instances.is_empty(), "nothing created without its agent");
}
