//! The lifecycle steps of each [`Action`]. Each step is idempotent, so a change interrupted anywhere (crash,
//! kill -9, cancelled future) converges when the next plan asks for it again.
//!
//! - Create: register agent → create instance labelled with its agent record's id (`ciscale.agent`; an existing
//!   owned one of that name is taken over; a refused create deregisters the agent again) → (containers) wait
//!   ready → push credential file → start agent. A cloud instance starts its agent from its user data.
//! - Start: start instance → (containers) wait ready → undrain agent.
//! - Stop: stop instance. Drain: drain agent.
//! - Delete: check owner → delete instance (gone = done) → deregister agent (gone = done).
//! - Replace: Delete, then Create with the pool's current spec. Deregister: deregister agent (gone = done).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::model::{
    AgentRef, BackendName, CiName, Desired, InstanceId, InstanceState, PoolSpec, Secret, AGENT_LABEL, EPHEMERAL_LABEL,
    JOB_LABEL, OWNER_LABEL, POOL_LABEL,
};
use crate::plan::{Action, AgentTarget, Change, InstanceTarget};
use crate::providers::{
    AgentCredential, Backend, CiSource, CloudLaunch, CreateInstance, Error, Exec, ListInstances, Providers, PushFile,
    RegisterAgent, Result,
};

use super::bootstrap::{agent_env_file, bootstrap_env, CREDENTIAL_MODE, CREDENTIAL_PATH};
use super::cloud_init::cloud_init;
use super::retry::{is_retryable, with_retries};
use super::{ApplyOptions, Event, Learned, Outcome, Redactor};

/// What every change's task reads.
pub(super) struct Shared {
    pub desired: Desired,
    pub providers: Providers,
    pub options: ApplyOptions,
    pub redactor: Redactor,
}

/// A step that failed, its message already redacted.
struct StepFailure {
    step: String,
    error: String,
}

/// One change being executed.
pub(super) struct ChangeRun<'run> {
    shared: &'run Shared,
    change: &'run Change,
    index: usize,
    events: &'run mpsc::UnboundedSender<Event>,
    /// The step running now, for the message when the change is abandoned at its deadline.
    step: &'run std::sync::Mutex<String>,
    /// The shared redactor plus the secrets this change learns (the agent's fresh token).
    redactor: Redactor,
}

impl<'run> ChangeRun<'run> {
    pub(super) fn new(
        shared: &'run Shared,
        change: &'run Change,
        index: usize,
        events: &'run mpsc::UnboundedSender<Event>,
        step: &'run std::sync::Mutex<String>,
    ) -> Self {
        Self { shared, change, index, events, step, redactor: shared.redactor.clone() }
    }

    pub(super) async fn run(mut self) -> Outcome {
        match self.execute().await {
            Ok(()) => {
                tracing::info!("change done");
                Outcome::Done
            }
            Err(failure) => {
                tracing::warn!(step = %failure.step, error = %failure.error, "change failed");
                Outcome::Failed { step: failure.step, error: failure.error }
            }
        }
    }

    async fn execute(&mut self) -> Result<(), StepFailure> {
        let change = self.change;
        match change.action {
            Action::Create => self.create(self.instance_target()?).await,
            Action::Start => {
                let (backend, id) = self.existing_instance()?;
                self.call("start instance", || backend.start(&id))
                    .await
                    .map_err(|e| self.failed("start instance", &e))?;
                // As for a create: an agent that starts with its instance needs nothing more from us, and its boot
                // is observed on later cycles rather than waited for here.
                if backend.capabilities().exec {
                    self.wait_ready(&backend, &id).await?;
                }
                if let Some(agent) = &change.agent {
                    let ci = self.ci(&agent.ci)?;
                    self.call("undrain agent", || ci.undrain(&agent.id))
                        .await
                        .map_err(|e| self.failed("undrain agent", &e))?;
                }
                Ok(())
            }
            Action::Stop => {
                let (backend, id) = self.existing_instance()?;
                self.call("stop instance", || backend.stop(&id)).await.map_err(|e| self.failed("stop instance", &e))
            }
            Action::Drain => {
                let agent = self.agent_target()?;
                let ci = self.ci(&agent.ci)?;
                self.call("drain agent", || ci.drain(&agent.id)).await.map_err(|e| self.failed("drain agent", &e))
            }
            Action::Delete => self.delete().await,
            Action::Replace => {
                self.delete().await?;
                self.create(self.instance_target()?).await
            }
            Action::Deregister => self.deregister(self.agent_target()?).await,
        }
    }

    // -- steps -----------------------------------------------------------------------------------------------

    async fn create(&mut self, target: &'run InstanceTarget) -> Result<(), StepFailure> {
        let shared = self.shared;
        let pool = shared.desired.pool(&self.change.pool).ok_or_else(|| {
            self.fail(
                "resolve",
                format!(
                    "pool `{}` is not in the config\nhint: re-run `ciscale plan` with the current config",
                    self.change.pool
                ),
            )
        })?;
        let ci = self.ci(&pool.ci.source)?;
        let backend = self.backend(&target.backend)?;

        let mut agent_labels = pool.ci.labels.clone();
        if pool.scale.ephemeral {
            agent_labels.insert(EPHEMERAL_LABEL.to_owned(), "true".to_owned());
        }
        let credential = match (&pool.agent.preregistered, &self.change.agent) {
            // Picus mode: the agent exists and authenticates with the shared secret in the pool's secret env.
            (Some(_), Some(agent)) => {
                AgentCredential { agent_id: agent.id.clone(), token: Secret::new(String::new()), env: BTreeMap::new() }
            }
            (Some(reference), None) => {
                return Err(self.fail(
                    "find pre-registered agent",
                    format!(
                        "the pre-registered agent {} of pool `{}` is not in the ci source `{}`\nhint: register it in the CI or fix `agent.preregistered`",
                        describe_ref(reference),
                        pool.name,
                        pool.ci.source
                    ),
                ));
            }
            (None, _) => {
                let register = RegisterAgent {
                    name: target.name.clone(),
                    pool: pool.name.clone(),
                    labels: agent_labels,
                    // The job the plan made this create for (job-bound sources); the instance carries it too.
                    for_job: self.change.after.get(&format!("label.{JOB_LABEL}")).cloned(),
                };
                let credential = self
                    .call("register agent", || ci.register(&register))
                    .await
                    .map_err(|e| self.failed("register agent", &e))?;
                self.redactor.add(credential.token.expose());
                tracing::info!(agent = %credential.agent_id, "agent registered");
                self.learned(Learned::Agent(credential.agent_id.clone()));
                credential
            }
        };
        let capabilities = backend.capabilities();
        let launch = ci.capabilities().launch;
        // Containers get the credential as a file once running, read by the image's wrapper; clouds only through
        // user data, which runs the CI's own agent as the source's launch says (with the token under the name
        // that agent reads).
        let env_file = if capabilities.exec {
            bootstrap_env(&pool.agent, &credential)
        } else {
            agent_env_file(&pool.agent, &credential, launch.token_env)
        }
        .map_err(|e| self.fail("write credential", e))?;
        let user_data = if capabilities.exec { None } else { Some(self.cloud_user_data(pool, &ci, &env_file)?) };
        let mut labels = self.instance_labels(pool)?;
        // The link from the instance to its agent record, for when the agent is not named after it (a
        // pre-registered agent): an orphaned instance is then never deleted under a busy agent.
        // Only a real record id fits a label value everywhere (Hetzner: `[a-zA-Z0-9._-]`, 63 characters): an
        // agent that registers itself later (Azure's `unregistered:<name>` placeholder) is linked by its name.
        if is_label_value(credential.agent_id.as_str()) {
            labels.insert(AGENT_LABEL.to_owned(), credential.agent_id.to_string());
        }
        let request = CreateInstance {
            name: target.name.clone(),
            pool: pool.name.clone(),
            labels,
            machine: prefixed(&self.change.after, "machine."),
            user_data,
            attempt: Some(credential.agent_id.as_str().to_owned()),
        };
        let (id, running) = match self.call("create instance", || backend.create(&request)).await {
            // A backend whose create waits for the start (Incus) returns it running: no need to ask again.
            Ok(instance) => (instance.id, instance.state == InstanceState::Running),
            // A previous apply died after creating it (or its response was lost): carry on with that one. On a
            // user-data backend it holds the credential of the earlier registration; if the CI rotated it, the
            // agent never checks in and the planner's bootstrap timeout replaces the instance.
            Err(Error::AlreadyExists { .. }) => (self.find_owned(&backend, &target.name).await?, false),
            Err(error) => {
                if pool.agent.preregistered.is_none() && refused_outright(&error) {
                    // No instance will come: without the agent record registered for it, the planner does not
                    // count it as a create in flight (plan::records) and plans the create again next cycle.
                    // Best effort: a record left behind only holds its pool back until its bootstrap timeout.
                    if let Err(undo) = ci.deregister(&credential.agent_id).await {
                        tracing::warn!(agent = %credential.agent_id, error = %self.redactor.redact(&undo.to_string()), "could not remove the agent record of a refused create");
                    }
                }
                return Err(self.failed("create instance", &error));
            }
        };
        tracing::info!(instance = %id, "instance created");
        self.learned(Learned::Instance(id.clone()));

        // A cloud instance starts its agent from its user data: nothing is left to do here, and waiting for it
        // to boot (a minute on some clouds) would only hold up the cycle. Whether it came up is observed on later
        // cycles (the agent checks in, or the bootstrap timeout replaces it).
        if capabilities.exec {
            if !running {
                self.wait_ready(&backend, &id).await?;
            }
            let file =
                PushFile { path: CREDENTIAL_PATH.to_owned(), content: env_file, mode: CREDENTIAL_MODE, uid: 0, gid: 0 };
            self.call("push credential", || backend.push_file(&id, &file))
                .await
                .map_err(|e| self.failed("push credential", &e))?;
            // Fire and forget: the agent runs for as long as the instance does.
            let exec = Exec { command: vec![launch.container_command.to_owned()], env: BTreeMap::new(), wait: false };
            self.call("start agent", || backend.exec(&id, &exec)).await.map_err(|e| self.failed("start agent", &e))?;
        }
        if pool.agent.preregistered.is_some() {
            // It was drained before its previous instance went away.
            self.call("undrain agent", || ci.undrain(&credential.agent_id))
                .await
                .map_err(|e| self.failed("undrain agent", &e))?;
        }
        Ok(())
    }

    /// The user data of a cloud server for the pool's CI: the agent container (the pool's image, else the CI's
    /// default), or the source's own user data ([`CloudLaunch::OwnUserData`]).
    fn cloud_user_data(
        &self,
        pool: &PoolSpec,
        ci: &Arc<dyn CiSource>,
        env_file: &Secret,
    ) -> Result<Secret, StepFailure> {
        const STEP: &str = "write user data";
        match ci.capabilities().launch.cloud {
            CloudLaunch::Docker { default_image, needs } => {
                let Some(image) = pool.agent.image.as_deref().or(default_image) else {
                    return Err(self.fail(
                        STEP,
                        format!(
                            "pool `{}` names no `agent.image` and ci source `{}` has no default for cloud servers\nhint: {needs}",
                            pool.name, pool.ci.source
                        ),
                    ));
                };
                cloud_init(Some(image), env_file).map_err(|e| self.fail(STEP, e))
            }
            CloudLaunch::OwnUserData => ci.cloud_user_data(env_file).map_err(|e| self.failed(STEP, &e)),
        }
    }

    /// Finds the instance named `name` among those this config owns; one with that name that it does not own is
    /// never taken over.
    async fn find_owned(&self, backend: &Arc<dyn Backend>, name: &str) -> Result<InstanceId, StepFailure> {
        let owner = &self.shared.desired.owner;
        let request = ListInstances { owner: owner.clone(), adopted: Vec::new(), images: Vec::new() };
        let observation = self
            .call("find existing instance", || backend.observe(&request))
            .await
            .map_err(|e| self.failed("find existing instance", &e))?;
        observation.instances.into_iter().find(|instance| instance.name == name).map(|instance| instance.id).ok_or_else(
            || {
                self.fail(
                    "create instance",
                    format!(
                        "an instance named `{name}` exists but is not labelled `{OWNER_LABEL}={owner}`\nhint: \
                         ciscale never touches what it does not own: rename or remove that instance"
                    ),
                )
            },
        )
    }

    /// Polls the instance until it runs. A stopped one is started once (an interrupted create or start).
    async fn wait_ready(&self, backend: &Arc<dyn Backend>, id: &InstanceId) -> Result<(), StepFailure> {
        const STEP: &str = "wait ready";
        self.announce(STEP);
        let deadline = Instant::now() + self.shared.options.ready_timeout;
        let mut started = false;
        loop {
            match backend.get(id).await {
                Ok(instance) => match instance.state {
                    InstanceState::Running => return Ok(()),
                    InstanceState::Stopped if !started => {
                        started = true;
                        self.call("start instance", || backend.start(id))
                            .await
                            .map_err(|e| self.failed("start instance", &e))?;
                    }
                    InstanceState::Deleting | InstanceState::Terminated => {
                        return Err(
                            self.fail(STEP, format!("instance `{id}` is {} instead of starting", instance.state))
                        );
                    }
                    _ => {}
                },
                Err(error) if is_retryable(&error) => {
                    tracing::debug!(error = %self.redactor.redact(&error.to_string()), "instance not readable yet");
                }
                Err(error) => return Err(self.failed(STEP, &error)),
            }
            if Instant::now() >= deadline {
                return Err(self.fail(
                    STEP,
                    format!(
                        "instance `{id}` is not running after {}\nhint: check the instance's console or raise the \
                         ready timeout",
                        crate::model::GoDuration(self.shared.options.ready_timeout)
                    ),
                ));
            }
            tokio::time::sleep(self.shared.options.poll).await;
        }
    }

    async fn delete(&self) -> Result<(), StepFailure> {
        if let Some(instance) = &self.change.instance {
            let backend = self.backend(&instance.backend)?;
            let id = instance.id.as_ref().ok_or_else(|| {
                self.fail("resolve", format!("the change names instance `{}` without an id", instance.name))
            })?;
            let owner = &self.shared.desired.owner;
            // The last guard of "own only what you labelled": one read before the one irreversible call.
            match self.call("check owner", || backend.get(id)).await {
                Ok(found) if found.owner() != Some(owner.as_str()) => {
                    return Err(self.fail(
                        "check owner",
                        format!("refusing to delete instance `{id}`: it is not labelled `{OWNER_LABEL}={owner}`"),
                    ));
                }
                Ok(_) => match self.call("delete instance", || backend.delete(id)).await {
                    Ok(()) | Err(Error::NotFound { .. }) => {}
                    Err(error) => return Err(self.failed("delete instance", &error)),
                },
                Err(Error::NotFound { .. }) => tracing::info!(instance = %id, "instance already gone"),
                Err(error) => return Err(self.failed("check owner", &error)),
            }
        }
        if let Some(agent) = &self.change.agent {
            if self.is_preregistered(agent) {
                tracing::info!(agent = %agent.id, "keeping the pre-registered agent");
            } else {
                self.deregister(agent).await?;
            }
        }
        Ok(())
    }

    async fn deregister(&self, agent: &AgentTarget) -> Result<(), StepFailure> {
        let ci = self.ci(&agent.ci)?;
        match self.call("deregister agent", || ci.deregister(&agent.id)).await {
            Ok(()) => Ok(()),
            Err(Error::NotFound { .. }) => {
                tracing::info!(agent = %agent.id, "agent already gone");
                Ok(())
            }
            Err(error) => Err(self.failed("deregister agent", &error)),
        }
    }

    // -- helpers ---------------------------------------------------------------------------------------------

    /// A pre-registered agent (Picus mode) outlives its instances: it is never deregistered.
    fn is_preregistered(&self, agent: &AgentTarget) -> bool {
        self.shared.desired.pools.iter().any(|pool| match &pool.agent.preregistered {
            Some(AgentRef::Id(id)) => pool.ci.source == agent.ci && *id == agent.id,
            Some(AgentRef::Name(name)) => pool.ci.source == agent.ci && *name == agent.name,
            None => false,
        })
    }

    /// Announces and runs one provider call, with retries.
    async fn call<T, Call, Fut>(&self, step: &str, call: Call) -> Result<T>
    where
        Call: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.announce(step);
        let base = self.shared.options.poll.min(super::retry::MAX_RETRY_BASE);
        with_retries(step, base, |error| self.redactor.redact(&error.to_string()), call).await
    }

    fn announce(&self, step: &str) {
        tracing::info!(step, "step");
        if let Ok(mut current) = self.step.lock() {
            step.clone_into(&mut current);
        }
        let _ = self.events.send(Event::Step(self.index, step.to_owned()));
    }

    fn learned(&self, learned: Learned) {
        let _ = self.events.send(Event::Learned(self.index, learned));
    }

    fn fail(&self, step: &str, message: impl Display) -> StepFailure {
        StepFailure { step: step.to_owned(), error: self.redactor.redact(&message.to_string()) }
    }

    fn failed(&self, step: &str, error: &Error) -> StepFailure {
        self.fail(step, error)
    }

    fn instance_target(&self) -> Result<&'run InstanceTarget, StepFailure> {
        let change = self.change;
        change
            .instance
            .as_ref()
            .ok_or_else(|| self.fail("resolve", format!("a {} change needs an instance", change.action)))
    }

    fn agent_target(&self) -> Result<&'run AgentTarget, StepFailure> {
        let change = self.change;
        change.agent.as_ref().ok_or_else(|| self.fail("resolve", format!("a {} change needs an agent", change.action)))
    }

    fn existing_instance(&self) -> Result<(Arc<dyn Backend>, InstanceId), StepFailure> {
        let target = self.instance_target()?;
        let backend = self.backend(&target.backend)?;
        let id = target.id.clone().ok_or_else(|| {
            self.fail("resolve", format!("the change names instance `{}` without an id", target.name))
        })?;
        Ok((backend, id))
    }

    fn backend(&self, name: &BackendName) -> Result<Arc<dyn Backend>, StepFailure> {
        self.shared.providers.backends.get(name).cloned().ok_or_else(|| {
            self.fail("resolve", format!("backend `{name}` is not configured\nhint: is the plan from another config?"))
        })
    }

    fn ci(&self, name: &CiName) -> Result<Arc<dyn CiSource>, StepFailure> {
        self.shared.providers.ci.get(name).cloned().ok_or_else(|| {
            self.fail(
                "resolve",
                format!("CI source `{name}` is not configured\nhint: is the plan from another config?"),
            )
        })
    }

    /// The planned `label.*` attributes, with the owner and pool labels guaranteed: nothing is created unowned.
    fn instance_labels(&self, pool: &PoolSpec) -> Result<BTreeMap<String, String>, StepFailure> {
        let owner = &self.shared.desired.owner;
        let mut labels = prefixed(&self.change.after, "label.");
        let planned_owner = labels.entry(OWNER_LABEL.to_owned()).or_insert_with(|| owner.clone());
        if planned_owner != owner {
            return Err(self.fail(
                "resolve",
                format!(
                    "the plan labels the instance `{OWNER_LABEL}={planned_owner}` but the config's owner is `{owner}`\n\
                     hint: re-run `ciscale plan` with the current config"
                ),
            ));
        }
        labels.entry(POOL_LABEL.to_owned()).or_insert_with(|| pool.name.to_string());
        Ok(labels)
    }
}

/// A value every backend takes as a label (the strictest is Hetzner's: at most 63 of `a-zA-Z0-9._-`, starting
/// and ending alphanumeric).
fn is_label_value(value: &str) -> bool {
    let alnum = |byte: Option<&u8>| byte.is_some_and(u8::is_ascii_alphanumeric);
    (1..=63).contains(&value.len())
        && value.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
        && alnum(value.as_bytes().first())
        && alnum(value.as_bytes().last())
}

/// The backend answered a create with a refusal, so no instance exists or will (unlike a timeout or an
/// unavailable backend, after which it may).
fn refused_outright(error: &Error) -> bool {
    matches!(
        error,
        Error::Capacity { .. }
            | Error::RateLimited { .. }
            | Error::Unauthenticated { .. }
            | Error::Invalid { .. }
            | Error::Unsupported { .. }
            | Error::NotFound { .. }
    )
}

/// The entries of `attributes` whose key starts with `prefix`, with the prefix removed.
fn prefixed(attributes: &BTreeMap<String, String>, prefix: &str) -> BTreeMap<String, String> {
    attributes
        .iter()
        .filter_map(|(key, value)| key.strip_prefix(prefix).map(|key| (key.to_owned(), value.clone())))
        .collect()
}

fn describe_ref(reference: &AgentRef) -> String {
    match reference {
        AgentRef::Id(id) => format!("with id `{id}`"),
        AgentRef::Name(name) => format!("named `{name}`"),
    }
}
