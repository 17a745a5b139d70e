//! The fake backend: a container host that keeps stopped instances and can push files and exec.

use async_trait::async_trait;

use crate::model::{BackendObservation, Instance, InstanceId, InstanceState, OWNER_LABEL, POOL_LABEL};
use crate::providers::{
    Backend, Capabilities, CreateInstance, Error, Exec, ExecOutput, ListInstances, PushFile, Result,
};

use super::state::{sha256_hex, ExecRecord, FakeInstance, PushedFile, WorldState};
use super::{FakeWorld, Op};

/// The fake world's [`Backend`] (kind `fake`).
#[derive(Debug, Clone)]
pub struct FakeBackend {
    world: FakeWorld,
}

impl FakeBackend {
    pub(super) fn new(world: FakeWorld) -> Self {
        Self { world }
    }

    pub fn world(&self) -> &FakeWorld {
        &self.world
    }
}

fn not_found(id: &InstanceId) -> Error {
    Error::NotFound { what: format!("instance `{id}`") }
}

fn find<'state>(state: &'state mut WorldState, id: &InstanceId) -> Result<&'state mut FakeInstance> {
    state.instance_mut(id).ok_or_else(|| not_found(id))
}

fn require_running(instance: &FakeInstance) -> Result<()> {
    if instance.state == InstanceState::Running {
        Ok(())
    } else {
        Err(Error::Invalid {
            provider: "fake".to_owned(),
            message: format!("instance `{}` is {}, not running", instance.id, instance.state),
        })
    }
}

/// Without the exec capability the fake is a cloud: it has no way into its instances.
fn require_exec(state: &WorldState, operation: &'static str) -> Result<()> {
    if state.exec_capability {
        Ok(())
    } else {
        Err(Error::Unsupported { provider: "fake".to_owned(), operation })
    }
}

/// Journals `op` on instance `id` (when it exists) before it takes effect: who was busy at that moment.
fn journal(state: &mut WorldState, op: Op, id: &InstanceId) {
    let Some(instance) = state.instance_mut(id) else { return };
    let (name, pool) = (instance.name.clone(), instance.labels.get(POOL_LABEL).cloned());
    state.record(op.key(), &name, pool.as_deref());
}

/// A created instance boots in the background: it is `pending` when create returns and `running` the next time
/// anyone looks, so callers must wait for it.
fn finish_boot(instance: &mut FakeInstance) {
    if instance.state == InstanceState::Pending {
        instance.state = InstanceState::Running;
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { exec: self.world.snapshot().exec_capability, keeps_stopped: true }
    }

    async fn observe(&self, request: &ListInstances) -> Result<BackendObservation> {
        self.world
            .call(Op::BackendObserve, |state| {
                let mut instances = Vec::new();
                for instance in &mut state.instances {
                    let owned = instance.labels.get(OWNER_LABEL).is_some_and(|owner| owner == &request.owner);
                    if owned || request.adopted.contains(&instance.id) {
                        finish_boot(instance);
                        instances.push(instance.to_model());
                    }
                }
                Ok(BackendObservation { instances, prices: state.prices.clone(), missing_images: Vec::new() })
            })
            .await
    }

    async fn create(&self, request: &CreateInstance) -> Result<Instance> {
        self.world
            .call(Op::Create, |state| {
                if !request.labels.contains_key(OWNER_LABEL) {
                    return Err(Error::Invalid {
                        provider: "fake".to_owned(),
                        message: format!("instance `{}` has no `{OWNER_LABEL}` label", request.name),
                    });
                }
                if state.instances.iter().any(|instance| instance.name == request.name) {
                    return Err(Error::AlreadyExists { what: format!("instance `{}`", request.name) });
                }
                state.counters.instances += 1;
                let instance = FakeInstance {
                    id: InstanceId::new(format!("fake-{}", state.counters.instances)),
                    name: request.name.clone(),
                    state: InstanceState::Pending,
                    created_at: state.now(),
                    labels: request.labels.clone(),
                    attributes: request.machine.clone(),
                    user_data_sha256: request.user_data.as_ref().map(|data| sha256_hex(data.expose().as_bytes())),
                };
                let model = instance.to_model();
                state.instances.push(instance);
                state.record(Op::Create.key(), &request.name, request.labels.get(POOL_LABEL).map(String::as_str));
                Ok(model)
            })
            .await
    }

    async fn get(&self, id: &InstanceId) -> Result<Instance> {
        self.world
            .call(Op::Get, |state| {
                let instance = find(state, id)?;
                finish_boot(instance);
                Ok(instance.to_model())
            })
            .await
    }

    async fn start(&self, id: &InstanceId) -> Result<()> {
        self.world
            .call(Op::Start, |state| {
                journal(state, Op::Start, id);
                find(state, id)?.state = InstanceState::Running;
                Ok(())
            })
            .await
    }

    async fn stop(&self, id: &InstanceId) -> Result<()> {
        self.world
            .call(Op::Stop, |state| {
                journal(state, Op::Stop, id);
                find(state, id)?.state = InstanceState::Stopped;
                Ok(())
            })
            .await
    }

    async fn delete(&self, id: &InstanceId) -> Result<()> {
        self.world
            .call(Op::Delete, |state| {
                journal(state, Op::Delete, id);
                let before = state.instances.len();
                state.instances.retain(|instance| &instance.id != id);
                if state.instances.len() == before {
                    return Err(not_found(id));
                }
                // A deleted instance's files and processes go with it, as on a real host; keeping their records
                // would grow a long-running demo's state file without bound.
                state.pushed_files.retain(|file| &file.instance != id);
                state.execs.retain(|exec| &exec.instance != id);
                Ok(())
            })
            .await
    }

    async fn push_file(&self, id: &InstanceId, file: &PushFile) -> Result<()> {
        self.world
            .call(Op::PushFile, |state| {
                require_exec(state, "push_file")?;
                find(state, id)?;
                let content = file.content.expose().as_bytes();
                state.pushed_files.push(PushedFile {
                    instance: id.clone(),
                    path: file.path.clone(),
                    mode: file.mode,
                    uid: file.uid,
                    gid: file.gid,
                    sha256: sha256_hex(content),
                    len: content.len(),
                });
                Ok(())
            })
            .await
    }

    async fn exec(&self, id: &InstanceId, exec: &Exec) -> Result<ExecOutput> {
        self.world
            .call(Op::Exec, |state| {
                require_exec(state, "exec")?;
                require_running(find(state, id)?)?;
                state.execs.push(ExecRecord {
                    instance: id.clone(),
                    command: exec.command.clone(),
                    env: exec.env.clone(),
                    wait: exec.wait,
                });
                // `false` is the one command that fails, so callers' exit-code handling can be tested.
                let exit_code = if exec.command == ["false"] { 1 } else { 0 };
                Ok(ExecOutput { exit_code: exec.wait.then_some(exit_code) })
            })
            .await
    }
}
