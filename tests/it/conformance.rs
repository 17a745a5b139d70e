//! The provider conformance suite: one set of checks of the `Backend` and `CiSource` contracts, written once
//! over trait objects and run on every implementation (object_store's `integration.rs` style). The fakes run it
//! here; real backends call the same `pub` functions from their own test modules.
//!
//! Names are derived from `owner`/`prefix`, so a real account can run it repeatedly; every function cleans up
//! what it created when it passes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ciscale::model::FakeSpec;
use ciscale::model::{Instance, InstanceId, InstanceState, PoolName, Secret, OWNER_LABEL, POOL_LABEL};
use ciscale::providers::fake::FakeWorld;
use ciscale::providers::{Backend, CiSource, CreateInstance, Error, Exec, ListInstances, PushFile, RegisterAgent};

/// How many times [`wait_for_state`] looks before giving up, and how long it sleeps in between. Real backends
/// get their own numbers; the fake needs one look.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    pub attempts: u32,
    pub interval: Duration,
}

impl Patience {
    pub const FAKE: Patience = Patience { attempts: 5, interval: Duration::from_millis(1) };
}

pub fn owned_request(owner: &str, name: &str) -> CreateInstance {
    owned_request_on(owner, name, &BTreeMap::new())
}

/// [`owned_request`] with machine attributes, for backends that need some (a cloud needs a server type and image).
pub fn owned_request_on(owner: &str, name: &str, machine: &BTreeMap<String, String>) -> CreateInstance {
    CreateInstance {
        name: name.to_owned(),
        pool: PoolName::new("conformance"),
        labels: BTreeMap::from([
            (OWNER_LABEL.to_owned(), owner.to_owned()),
            (POOL_LABEL.to_owned(), "conformance".to_owned()),
        ]),
        machine: machine.clone(),
        user_data: None,
        attempt: None,
    }
}

/// Polls `get` until the instance is in `state`; panics (failing the test) with the last state seen otherwise.
pub async fn wait_for_state(
    backend: &dyn Backend,
    id: &InstanceId,
    state: InstanceState,
    patience: Patience,
) -> Instance {
    let mut last = None;
    for _ in 0..patience.attempts {
        match backend.get(id).await {
            Ok(instance) if instance.state == state => return instance,
            Ok(instance) => last = Some(instance.state.to_string()),
            Err(error) => last = Some(error.to_string()),
        }
        tokio::time::sleep(patience.interval).await;
    }
    panic!("instance `{id}` never reached `{state}`; last seen: {last:?}");
}

async fn listed(backend: &dyn Backend, request: &ListInstances) -> Vec<Instance> {
    match backend.observe(request).await {
        Ok(observation) => observation.instances,
        Err(error) => panic!("observe failed: {error}"),
    }
}

/// The [`Backend`] contract: create-if-absent, lifecycle, owner filtering, adoption, delete semantics, and
/// push-file/exec where the capabilities say so.
pub async fn backend_conformance(backend: Arc<dyn Backend>, owner: &str, patience: Patience) {
    backend_conformance_on(backend, owner, patience, &BTreeMap::new()).await;
}

/// [`backend_conformance`] with the `machine` every create uses (a backend that needs an image names it here).
/// A backend without [`Capabilities::keeps_stopped`](ciscale::providers::Capabilities) (ephemeral containers)
/// is checked for the other half of that promise: a stopped instance is gone, and its name is free again.
pub async fn backend_conformance_on(
    backend: Arc<dyn Backend>,
    owner: &str,
    patience: Patience,
    machine: &BTreeMap<String, String>,
) {
    let name = format!("{owner}-conformance-1");
    let only_owner = ListInstances { owner: owner.to_owned(), adopted: Vec::new(), images: Vec::new() };

    // create → listed with its labels
    let created = backend.create(&owned_request_on(owner, &name, machine)).await.expect("create");
    assert_eq!(created.name, name);
    assert!(
        matches!(created.state, InstanceState::Pending | InstanceState::Running),
        "a new instance is pending or running, not {}",
        created.state
    );
    let id = created.id.clone();
    let instances = listed(backend.as_ref(), &only_owner).await;
    let seen = instances.iter().find(|instance| instance.id == id).expect("the new instance is listed");
    assert_eq!(seen.owner(), Some(owner));
    assert_eq!(seen.pool(), Some(PoolName::new("conformance")));
    assert_eq!(instances.iter().filter(|instance| instance.name == name).count(), 1);

    // create-if-absent by name
    let again = backend.create(&owned_request_on(owner, &name, machine)).await;
    assert!(matches!(again, Err(Error::AlreadyExists { .. })), "second create of `{name}`: {again:?}");
    assert_eq!(
        listed(backend.as_ref(), &only_owner).await.iter().filter(|instance| instance.name == name).count(),
        1,
        "a refused create leaves no duplicate"
    );

    // get, and it comes up
    let got = backend.get(&id).await.expect("get");
    assert_eq!(got.id, id);
    assert_eq!(got.name, name);
    wait_for_state(backend.as_ref(), &id, InstanceState::Running, patience).await;

    // push-file and exec, where offered
    let capabilities = backend.capabilities();
    if capabilities.exec {
        let file = PushFile {
            path: "/tmp/ciscale-conformance".to_owned(),
            content: Secret::new("conformance\n"),
            mode: 0o400,
            uid: 0,
            gid: 0,
        };
        backend.push_file(&id, &file).await.expect("push_file");
        let run = |command: &str, wait: bool| Exec { command: vec![command.to_owned()], env: BTreeMap::new(), wait };
        assert_eq!(backend.exec(&id, &run("true", true)).await.expect("exec true").exit_code, Some(0));
        assert_eq!(backend.exec(&id, &run("false", true)).await.expect("exec false").exit_code, Some(1));
        let missing = InstanceId::new(format!("{owner}-conformance-missing"));
        let pushed = backend.push_file(&missing, &file).await;
        assert!(matches!(pushed, Err(Error::NotFound { .. })), "push_file into a missing instance: {pushed:?}");
    } else {
        let file = PushFile { path: "/tmp/x".to_owned(), content: Secret::new("x"), mode: 0o400, uid: 0, gid: 0 };
        let pushed = backend.push_file(&id, &file).await;
        assert!(matches!(pushed, Err(Error::Unsupported { .. })), "push_file without the capability: {pushed:?}");
    }

    // stop / start, idempotent
    backend.stop(&id).await.expect("stop");
    if capabilities.keeps_stopped {
        wait_for_state(backend.as_ref(), &id, InstanceState::Stopped, patience).await;
        backend.stop(&id).await.expect("stop of a stopped instance succeeds");
        let listed_stopped = listed(backend.as_ref(), &only_owner).await;
        assert!(listed_stopped.iter().any(|instance| instance.id == id), "a stopped instance is still listed");
    } else {
        wait_until_gone(backend.as_ref(), &id, patience).await;
        assert!(
            !listed(backend.as_ref(), &only_owner).await.iter().any(|instance| instance.id == id),
            "a stopped instance of a backend that keeps none is not listed"
        );
        let stop_gone = backend.stop(&id).await;
        assert!(matches!(stop_gone, Err(Error::NotFound { .. })), "stop of a vanished instance: {stop_gone:?}");
        // Its name is free again: the replacement of a finished ephemeral agent can take it.
        let recreated =
            backend.create(&owned_request_on(owner, &name, machine)).await.expect("create again after stop");
        assert_eq!(recreated.id, id);
    }
    backend.start(&id).await.expect("start");
    wait_for_state(backend.as_ref(), &id, InstanceState::Running, patience).await;
    backend.start(&id).await.expect("start of a running instance succeeds");

    // an instance of another owner is never listed, unless adopted by id
    let other_owner = format!("{owner}-other");
    let foreign_name = format!("{owner}-conformance-foreign");
    let foreign =
        backend.create(&owned_request_on(&other_owner, &foreign_name, machine)).await.expect("create foreign");
    let instances = listed(backend.as_ref(), &only_owner).await;
    assert!(instances.iter().all(|instance| instance.owner() == Some(owner)), "only owned instances: {instances:?}");
    assert!(instances.iter().all(|instance| instance.id != foreign.id));
    let with_adopted = ListInstances { owner: owner.to_owned(), adopted: vec![foreign.id.clone()], images: Vec::new() };
    let instances = listed(backend.as_ref(), &with_adopted).await;
    assert!(instances.iter().any(|instance| instance.id == foreign.id), "the adopted instance is listed");
    assert!(instances.iter().any(|instance| instance.id == id), "owned ones are still listed with adoption");
    let unknown_adopted = ListInstances {
        owner: owner.to_owned(),
        adopted: vec![InstanceId::new(format!("{owner}-conformance-never-created"))],
        images: Vec::new(),
    };
    assert!(
        backend.observe(&unknown_adopted).await.is_ok(),
        "an adopted id that does not exist is left out, not an error"
    );

    // delete → gone; delete again → NotFound
    backend.delete(&id).await.expect("delete");
    let mut gone = false;
    for _ in 0..patience.attempts {
        let instances = listed(backend.as_ref(), &only_owner).await;
        if !instances.iter().any(|instance| {
            instance.id == id && !matches!(instance.state, InstanceState::Terminated | InstanceState::Deleting)
        }) {
            gone = true;
            break;
        }
        tokio::time::sleep(patience.interval).await;
    }
    assert!(gone, "deleted instance `{id}` is still listed");
    let again = backend.delete(&id).await;
    assert!(matches!(again, Err(Error::NotFound { .. })), "second delete: {again:?}");
    let get_gone = backend.get(&id).await;
    assert!(
        matches!(get_gone, Err(Error::NotFound { .. }))
            || matches!(&get_gone, Ok(instance) if instance.state == InstanceState::Terminated),
        "get of a deleted instance: {get_gone:?}"
    );

    backend.delete(&foreign.id).await.expect("clean up the foreign instance");
}

/// Polls `get` until the instance is gone (`NotFound`, or `Terminated` where the cloud keeps a record).
pub async fn wait_until_gone(backend: &dyn Backend, id: &InstanceId, patience: Patience) {
    let mut last = None;
    for _ in 0..patience.attempts {
        match backend.get(id).await {
            Err(Error::NotFound { .. }) => return,
            Ok(instance) if instance.state == InstanceState::Terminated => return,
            Ok(instance) => last = Some(instance.state.to_string()),
            Err(error) => last = Some(error.to_string()),
        }
        tokio::time::sleep(patience.interval).await;
    }
    panic!("instance `{id}` is still there; last seen: {last:?}");
}

/// The [`CiSource`] contract: register is create-if-absent by name, drain/undrain are idempotent where the CI
/// can drain ([`CiCapabilities::drain`](ciscale::providers::CiCapabilities), else `Unsupported`), deregister of
/// a missing agent is `NotFound`.
pub async fn ci_conformance(ci: Arc<dyn CiSource>, prefix: &str) {
    ci_contract(ci, prefix, Registration::CreatesRecord, Reregistration::KeepsRecord).await;
}

/// [`ci_conformance`] for a CI that shows an agent's token only when it creates the record (Forgejo): `register`
/// of an existing name cannot hand that token out again, so it replaces the record — a new id and a new token,
/// and still exactly one agent of that name.
pub async fn ci_conformance_replacing(ci: Arc<dyn CiSource>, prefix: &str) {
    ci_contract(ci, prefix, Registration::CreatesRecord, Reregistration::ReplacesRecord).await;
}

/// What `register` of a name that exists does: the second half of the registration capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reregistration {
    /// The same record, with a credential that works (Woodpecker shows tokens to the admin; the fake re-issues).
    KeepsRecord,
    /// The record is deleted and made anew: a new id, a new token.
    ReplacesRecord,
}

/// A future a test returns from its "agent comes online" hook.
pub type Online<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>;

/// How agent records come to exist: the capability flag of the CI half of the suite.
pub enum Registration<'a> {
    /// `register` creates the record (Woodpecker, the fake): it is listed right away under the returned id.
    CreatesRecord,
    /// The agent registers itself (Azure Pipelines: `config.sh` on the instance): `register` only hands out a
    /// credential, and the record appears once the agent runs. The hook plays that agent: it is called with the
    /// agent's name and must make the CI list an agent of that name.
    SelfRegistering(&'a dyn Fn(String) -> Online<'a>),
}

/// [`ci_conformance`] for a CI whose agents register themselves: before the agent comes online no record is
/// listed; after it, the record behaves exactly as the contract says (and `register` again returns its id).
pub async fn ci_conformance_self_registering<'a>(
    ci: Arc<dyn CiSource>,
    prefix: &str,
    come_online: &'a dyn Fn(String) -> Online<'a>,
) {
    ci_contract(ci, prefix, Registration::SelfRegistering(come_online), Reregistration::KeepsRecord).await;
}

async fn ci_contract(
    ci: Arc<dyn CiSource>,
    prefix: &str,
    registration: Registration<'_>,
    reregistration: Reregistration,
) {
    let name = format!("{prefix}-conformance-agent");
    let request = RegisterAgent {
        name: name.clone(),
        pool: PoolName::new("conformance"),
        labels: BTreeMap::from([("platform".to_owned(), "linux/amd64".to_owned())]),
        for_job: None,
    };

    let first = ci.register(&request).await.expect("register");
    assert!(!first.token.expose().is_empty(), "a registered agent gets a token");
    let agent_id = match registration {
        Registration::CreatesRecord => first.agent_id.clone(),
        Registration::SelfRegistering(come_online) => {
            let observed = ci.observe().await.expect("observe");
            assert!(
                observed.agents.iter().all(|agent| agent.name != name),
                "a self-registering CI lists no record before the agent registered: {:?}",
                observed.agents
            );
            come_online(name.clone()).await;
            let observed = ci.observe().await.expect("observe");
            let found =
                observed.agents.iter().find(|agent| agent.name == name).expect("the agent is listed once online");
            found.id.clone()
        }
    };
    let observed = ci.observe().await.expect("observe");
    let agent = observed.agents.iter().find(|agent| agent.id == agent_id).expect("the new agent is listed");
    assert_eq!(agent.name, name);
    assert!(!agent.no_schedule, "a new agent takes jobs");
    assert!(!agent.busy, "a new agent runs nothing");

    let second = ci.register(&request).await.expect("register again");
    let agent_id = match reregistration {
        Reregistration::KeepsRecord => {
            assert_eq!(second.agent_id, agent_id, "register is create-if-absent by name");
            agent_id
        }
        Reregistration::ReplacesRecord => {
            assert!(!second.token.expose().is_empty(), "the new record comes with a token");
            assert_ne!(second.token.expose(), first.token.expose(), "the replaced record's token is not handed out");
            second.agent_id.clone()
        }
    };
    let observed = ci.observe().await.expect("observe");
    let named: Vec<_> = observed.agents.iter().filter(|agent| agent.name == name).collect();
    assert_eq!(named.len(), 1, "no duplicate agent: {named:?}");
    assert_eq!(named[0].id, agent_id, "the listed agent is the one register returned");

    let no_schedule = |observed: &ciscale::model::CiObservation| {
        observed.agents.iter().find(|agent| agent.id == agent_id).map(|agent| agent.no_schedule)
    };
    let can_drain = ci.capabilities().drain;
    if can_drain {
        ci.drain(&agent_id).await.expect("drain");
        ci.drain(&agent_id).await.expect("drain is idempotent");
        assert_eq!(no_schedule(&ci.observe().await.expect("observe")), Some(true));
        ci.undrain(&agent_id).await.expect("undrain");
        ci.undrain(&agent_id).await.expect("undrain is idempotent");
        assert_eq!(no_schedule(&ci.observe().await.expect("observe")), Some(false));
    } else {
        let drained = ci.drain(&agent_id).await;
        assert!(matches!(drained, Err(Error::Unsupported { .. })), "drain without the capability: {drained:?}");
        let undrained = ci.undrain(&agent_id).await;
        assert!(matches!(undrained, Err(Error::Unsupported { .. })), "undrain without the capability: {undrained:?}");
        assert_eq!(no_schedule(&ci.observe().await.expect("observe")), Some(false), "nothing was drained");
    }

    ci.deregister(&agent_id).await.expect("deregister");
    assert_eq!(no_schedule(&ci.observe().await.expect("observe")), None, "a deregistered agent is not listed");
    let again = ci.deregister(&agent_id).await;
    assert!(matches!(again, Err(Error::NotFound { .. })), "second deregister: {again:?}");
    if can_drain {
        let drained_missing = ci.drain(&agent_id).await;
        assert!(
            matches!(drained_missing, Err(Error::NotFound { .. })),
            "drain of a missing agent: {drained_missing:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The fakes
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn fake_backend_in_memory() {
    let world = FakeWorld::new();
    backend_conformance(Arc::new(world.backend()), "conformance", Patience::FAKE).await;
    // The suite cleans up after itself.
    assert!(world.snapshot().instances.is_empty());
}

#[tokio::test]
async fn fake_backend_without_exec_capability() {
    let world = FakeWorld::new();
    world.set_exec_capability(false);
    // Without the capability the fake refuses push-file/exec, as a cloud backend does: the suite's other branch.
    backend_conformance(Arc::new(world.backend()), "conformance", Patience::FAKE).await;
}

#[tokio::test]
async fn fake_ci_in_memory() {
    let world = FakeWorld::new();
    ci_conformance(Arc::new(world.ci()), "conformance").await;
    assert!(world.snapshot().agents.is_empty());
}

#[tokio::test]
async fn fake_backend_and_ci_file_backed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = FakeSpec { state_file: Some(dir.path().join("world.json")), simulate: false, jobs: None };
    let world = FakeWorld::open(&spec).expect("open");
    backend_conformance(Arc::new(world.backend()), "conformance", Patience::FAKE).await;
    // A second handle on the same file (as a second process would have) passes too, and sees the first's state.
    let other = FakeWorld::open(&spec).expect("open again");
    ci_conformance(Arc::new(other.ci()), "conformance").await;
    assert!(dir.path().join("world.json").exists(), "the world lives in the file");
    assert_eq!(world.snapshot(), other.snapshot());
    assert_eq!(world.snapshot().counters.instances, 2, "both instances of the backend run were counted");
}
