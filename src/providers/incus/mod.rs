//! The Incus backend: ephemeral system containers on an Incus host, over its REST API on the unix socket.
//!
//! Owns the mapping between ciscale's vocabulary and Incus's:
//! - labels ↔ `user.<label>` config keys (`ciscale.pool` ↔ `user.ciscale.pool`); the owner filter is one
//!   `GET /1.0/instances?recursion=1&filter=config.user.ciscale.owner eq <owner>` per project per cycle;
//! - a pool's `machine` map ↔ the instance's config and devices (see [`machine`]), and back into comparable
//!   `attributes` for drift detection;
//! - Incus statuses ↔ [`InstanceState`].
//!
//! Containers are created ephemeral: one that stops (the agent's wrapper powers it off after its one job) is
//! deleted by Incus itself, so [`Capabilities::keeps_stopped`] is false. The events stream
//! ([`events`]) tells `watch` at once when that happens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use hyper::Method;
use jiff::Timestamp;
use serde_json::{json, Value};

use crate::model::{BackendObservation, Instance, InstanceId, InstanceState, OWNER_LABEL};
use crate::providers::{
    Backend, Capabilities, CreateInstance, Error, Exec, ExecOutput, ListInstances, PushFile, Result,
};

pub(crate) mod client;
pub mod events;
pub mod machine;
pub mod provision;

use client::{encode, Call, Client, Reply, PROVIDER};

/// The socket used when neither the config nor `INCUS_SOCKET` names one.
pub const DEFAULT_SOCKET: &str = "/var/lib/incus/unix.socket";
/// Incus's record of an instance's last power state (`RUNNING`, `STOPPED`), set by its stop and start hooks.
const POWER_STATE_KEY: &str = "volatile.last_state.power";
/// The config key under which a label is stored: label `ciscale.pool` is key `user.ciscale.pool`.
pub const LABEL_KEY_PREFIX: &str = "user.";

/// A connection to one Incus server (and project). Cheap to clone; every request opens its own connection.
#[derive(Debug, Clone)]
pub struct Incus {
    client: Client,
    /// Bound on waiting for one operation (create, start, stop, delete, exec with `wait`).
    operation_timeout: Duration,
    /// How long a clean stop may take before the instance is stopped by force.
    stop_timeout: Duration,
}

impl Incus {
    /// `socket`: the config's value, else `INCUS_SOCKET`, else [`DEFAULT_SOCKET`]. `project`: `None` is Incus's
    /// `default` project.
    pub fn new(socket: Option<&str>, project: Option<&str>) -> Self {
        let socket = socket
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("INCUS_SOCKET").filter(|value| !value.is_empty()).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        Self {
            client: Client {
                socket,
                project: project.filter(|project| !project.is_empty()).map(str::to_owned),
                request_timeout: Duration::from_secs(30),
            },
            operation_timeout: Duration::from_secs(120),
            stop_timeout: Duration::from_secs(30),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.client.socket
    }

    pub fn project(&self) -> Option<&str> {
        self.client.project.as_deref()
    }

    /// How long a clean stop may take before it is forced [30s].
    pub fn with_stop_timeout(mut self, stop_timeout: Duration) -> Self {
        self.stop_timeout = stop_timeout;
        self
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn operation_timeout(&self) -> Duration {
        self.operation_timeout
    }

    /// The raw instance object (`GET /1.0/instances/NAME`): config, devices, profiles, status.
    pub async fn instance_json(&self, name: &str) -> Result<Value> {
        Ok(self.client.send(Call::get(format!("/1.0/instances/{}", encode(name)))).await?.into_sync())
    }

    /// The image aliases of the project: one `GET /1.0/images/aliases?recursion=1`.
    pub async fn image_aliases(&self) -> Result<std::collections::BTreeSet<String>> {
        let listed = self.client.send(Call::get("/1.0/images/aliases?recursion=1")).await?.into_sync();
        let aliases = listed.as_array().ok_or_else(|| Error::Other {
            provider: PROVIDER.into(),
            source: "the image alias list is not an array".into(),
        })?;
        Ok(aliases.iter().filter_map(|alias| alias.get("name").and_then(Value::as_str)).map(str::to_owned).collect())
    }

    /// Stops an instance: cleanly within the stop timeout, else by force. Already stopped, or an ephemeral one
    /// already gone after its stop, is done.
    async fn stop_instance(&self, name: &str) -> Result<()> {
        let path = format!("/1.0/instances/{}/state", encode(name));
        let clean = json!({ "action": "stop", "timeout": self.stop_timeout.as_secs(), "force": false });
        let result =
            self.client.send_and_wait(Call::json(Method::PUT, &path, &clean), self.stop_timeout + OP_SLACK).await;
        match result {
            Ok(_) => Ok(()),
            Err(error) if already(&error, "already stopped") || already(&error, "not running") => Ok(()),
            Err(Error::NotFound { .. }) => Ok(()),
            Err(error) => {
                tracing::debug!(instance = name, %error, "clean stop failed; forcing");
                let force = json!({ "action": "stop", "timeout": -1, "force": true });
                match self.client.send_and_wait(Call::json(Method::PUT, &path, &force), self.operation_timeout).await {
                    Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
                    Err(error) if already(&error, "already stopped") || already(&error, "not running") => Ok(()),
                    Err(error) => Err(error),
                }
            }
        }
    }
}

/// An operation failure saying the instance is still being created by another request.
fn is_busy_creating(error: &Error) -> bool {
    matches!(error, Error::Unavailable { message, .. } if message.contains("busy running a \"create\" operation"))
}

impl Incus {
    /// Waits (bounded) for the operation still creating `name` to end; `true` when `name` exists afterwards.
    async fn finish_create_in_progress(&self, name: &str) -> Result<bool> {
        let listed = self.client.send(Call::get("/1.0/operations?recursion=1")).await?.into_sync();
        let resource = format!("/1.0/instances/{name}");
        let creating = listed
            .get("running")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|operation| {
                operation.get("description").and_then(Value::as_str) == Some("Creating instance")
                    && operation.pointer("/resources/instances").and_then(Value::as_array).is_some_and(|instances| {
                        instances
                            .iter()
                            .filter_map(Value::as_str)
                            .any(|path| path.split('?').next() == Some(resource.as_str()))
                    })
            })
            .and_then(|operation| operation.get("id").and_then(Value::as_str))
            .map(|id| format!("/1.0/operations/{id}"));
        if let Some(operation) = creating {
            tracing::info!(instance = name, "waiting for the create an earlier request started");
            // Its failure is the earlier request's; whether the instance exists is what counts here.
            drop(self.client.wait(&operation, self.operation_timeout).await);
        }
        match self.instance_json(name).await {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }
}

/// Slack on top of an operation's own timeout, so the server answers before our bound fires.
const OP_SLACK: Duration = Duration::from_secs(10);

/// Incus answers "already in that state" as an error; for idempotent calls that is success.
fn already(error: &Error, phrase: &str) -> bool {
    match error {
        Error::Invalid { message, .. } | Error::Unavailable { message, .. } => message.to_lowercase().contains(phrase),
        Error::Other { source, .. } => source.to_string().to_lowercase().contains(phrase),
        _ => false,
    }
}

/// Maps Incus's status names onto ciscale's states.
pub fn state_of(status: &str) -> InstanceState {
    match status {
        "Running" | "Ready" => InstanceState::Running,
        "Starting" | "Pending" | "Thawed" => InstanceState::Pending,
        "Stopping" | "Aborting" | "Freezing" => InstanceState::Stopping,
        "Stopped" => InstanceState::Stopped,
        // Frozen and Error instances hold their slot but need a human (or a replacement) to move on.
        _ => InstanceState::Unknown,
    }
}

/// An Incus instance object as ciscale sees it. Labels are its `user.*` keys without the prefix (the image
/// alias key excepted, which is an attribute); attributes come from [`machine::attributes_of`].
pub fn instance_from_json(value: &Value) -> Result<Instance> {
    let malformed = |what: &str| Error::Other {
        provider: PROVIDER.into(),
        source: format!("instance object without a valid `{what}`").into(),
    };
    let name = value.get("name").and_then(Value::as_str).ok_or_else(|| malformed("name"))?;
    let status = value.get("status").and_then(Value::as_str).unwrap_or("Unknown");
    let created_at = value
        .get("created_at")
        .and_then(Value::as_str)
        .and_then(|text| text.parse::<Timestamp>().ok())
        .ok_or_else(|| malformed("created_at"))?;
    let empty = serde_json::Map::new();
    let config = value.get("config").and_then(Value::as_object).unwrap_or(&empty);
    let config: BTreeMap<&str, &str> =
        config.iter().filter_map(|(key, value)| value.as_str().map(|value| (key.as_str(), value))).collect();
    let mut state = state_of(status);
    // Incus deletes an ephemeral container once it stopped, but lists it as `Running` until its files are gone:
    // tens of milliseconds for a tiny image, seconds for a real agent image on a `dir` pool (11 s measured for
    // 300 MB in 20,000 files). Its stop hook has already recorded the power state `STOPPED`, and the event
    // stream has said `instance-shutdown`: reporting it as deleting lets the reconcile woken by that event create
    // the replacement at once instead of after `instance-deleted`. Only ephemeral ones: a stopped ephemeral
    // container is never started again (Incus deletes it), while a persistent one being started may show `Running`
    // before its start hook records `RUNNING`. (An ephemeral container rebooting itself looks the same for a
    // moment; its exec'd agent died with the reboot, so it is no running agent either.)
    let ephemeral = value.get("ephemeral").and_then(Value::as_bool).unwrap_or(false);
    if ephemeral && state == InstanceState::Running && config.get(POWER_STATE_KEY) == Some(&"STOPPED") {
        state = InstanceState::Deleting;
    }
    let labels = config
        .iter()
        .filter(|(key, _)| **key != machine::IMAGE_KEY)
        .filter_map(|(key, value)| {
            key.strip_prefix(LABEL_KEY_PREFIX).map(|label| (label.to_owned(), (*value).to_owned()))
        })
        .collect();
    let devices = value.get("devices").cloned().unwrap_or(Value::Null);
    let profiles: Vec<&str> = value
        .get("profiles")
        .and_then(Value::as_array)
        .map(|profiles| profiles.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    Ok(Instance {
        id: InstanceId::new(name),
        name: name.to_owned(),
        state,
        created_at,
        labels,
        attributes: machine::attributes_of(&config, &devices, &profiles),
    })
}

#[async_trait]
impl Backend for Incus {
    fn kind(&self) -> &'static str {
        "incus"
    }

    fn capabilities(&self) -> Capabilities {
        // Ephemeral containers vanish when stopped.
        Capabilities { exec: true, keeps_stopped: false }
    }

    async fn observe(&self, request: &ListInstances) -> Result<BackendObservation> {
        let filter = client::filter_eq(&format!("config.{LABEL_KEY_PREFIX}{OWNER_LABEL}"), &request.owner);
        let path = format!("/1.0/instances?recursion=1&filter={}", encode(&filter));
        let listed = self.client.send(Call::get(path)).await?.into_sync();
        let objects = listed.as_array().ok_or_else(|| Error::Other {
            provider: PROVIDER.into(),
            source: "the instance list is not an array".into(),
        })?;
        let mut instances = Vec::with_capacity(objects.len());
        for object in objects {
            let instance = instance_from_json(object)?;
            // The server filtered already; this check keeps "never an unowned instance" true even if a server
            // ignored the filter (old Incus versions do).
            if instance.owner() == Some(request.owner.as_str()) {
                instances.push(instance);
            }
        }
        for adopted in &request.adopted {
            if instances.iter().any(|instance| &instance.id == adopted) {
                continue;
            }
            match self.instance_json(adopted.as_str()).await {
                Ok(object) => instances.push(instance_from_json(&object)?),
                Err(Error::NotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        instances.sort_by(|a, b| a.name.cmp(&b.name));
        let missing_images = if request.images.is_empty() {
            Vec::new()
        } else {
            let aliases = self.image_aliases().await?;
            request.images.iter().filter(|image| !aliases.contains(machine::image_alias(image))).cloned().collect()
        };
        Ok(BackendObservation { instances, prices: BTreeMap::new(), missing_images })
    }

    async fn create(&self, request: &CreateInstance) -> Result<Instance> {
        let spec = machine::InstanceSpec::from_machine(&request.machine)?;
        let mut config = spec.config.clone();
        for (label, value) in &request.labels {
            config.insert(format!("{LABEL_KEY_PREFIX}{label}"), value.clone());
        }
        let mut body = json!({
            "name": request.name,
            "type": "container",
            "ephemeral": true,
            "start": true,
            "source": { "type": "image", "alias": spec.image },
            "config": config,
            "devices": spec.devices,
        });
        if let Some(profiles) = &spec.profiles {
            body["profiles"] = json!(profiles);
        }
        match self.client.send_and_wait(Call::json(Method::POST, "/1.0/instances", &body), self.operation_timeout).await
        {
            Ok(_) => {}
            Err(Error::AlreadyExists { .. }) => {
                return Err(Error::AlreadyExists { what: format!("incus instance `{}`", request.name) })
            }
            // incusd accepts every create and refuses a second one of a name in its background operation while the
            // first still runs: a create sent by a ciscale that was killed before it heard the answer. That one
            // makes the instance; once it is done, the name exists (create-if-absent).
            Err(busy @ Error::Unavailable { .. }) if is_busy_creating(&busy) => {
                return match self.finish_create_in_progress(&request.name).await? {
                    true => Err(Error::AlreadyExists {
                        what: format!("incus instance `{}` (created by an earlier request)", request.name),
                    }),
                    false => Err(busy),
                };
            }
            Err(Error::NotFound { what }) => {
                return Err(Error::Invalid {
                    provider: PROVIDER.into(),
                    message: format!(
                        "creating `{}` from image `{}`: {what}\nhint: build the image with `ciscale provision`",
                        request.name, spec.image
                    ),
                })
            }
            Err(error) => return Err(error),
        }
        self.get(&InstanceId::new(request.name.clone())).await
    }

    async fn get(&self, id: &InstanceId) -> Result<Instance> {
        match self.instance_json(id.as_str()).await {
            Ok(object) => instance_from_json(&object),
            Err(Error::NotFound { .. }) => Err(Error::NotFound { what: format!("incus instance `{id}`") }),
            Err(error) => Err(error),
        }
    }

    async fn start(&self, id: &InstanceId) -> Result<()> {
        let path = format!("/1.0/instances/{}/state", encode(id.as_str()));
        let body = json!({ "action": "start", "timeout": self.operation_timeout.as_secs() });
        let start = || self.client.send_and_wait(Call::json(Method::PUT, &path, &body), self.operation_timeout);
        let mut outcome = start().await;
        // A container listed while a create (of a killed run, with `start: true`) still runs in incusd looks
        // stopped, and incusd refuses to start it until that create is done: wait for it, then start (which is
        // "already running" once the create has started it).
        if matches!(&outcome, Err(busy) if is_busy_creating(busy))
            && self.finish_create_in_progress(id.as_str()).await?
        {
            outcome = start().await;
        }
        match outcome {
            Ok(_) => Ok(()),
            Err(error) if already(&error, "already running") => Ok(()),
            Err(Error::NotFound { .. }) => Err(Error::NotFound { what: format!("incus instance `{id}`") }),
            Err(error) => Err(error),
        }
    }

    async fn stop(&self, id: &InstanceId) -> Result<()> {
        // A missing instance is an error here (only delete treats "gone" as done, per the contract); an
        // ephemeral one vanishing during its own stop is success.
        self.get(id).await?;
        self.stop_instance(id.as_str()).await
    }

    async fn delete(&self, id: &InstanceId) -> Result<()> {
        let instance = self.get(id).await?;
        if instance.state != InstanceState::Stopped {
            // Deleting throws the container away (the planner deletes only drained, idle agents): no point
            // waiting for a clean shutdown, which an init that ignores SIGPWR would stretch to the stop timeout.
            let path = format!("/1.0/instances/{}/state", encode(id.as_str()));
            let force = json!({ "action": "stop", "timeout": -1, "force": true });
            match self.client.send_and_wait(Call::json(Method::PUT, path, &force), self.operation_timeout).await {
                Ok(_) | Err(Error::NotFound { .. }) => {}
                Err(error) if already(&error, "already stopped") || already(&error, "not running") => {}
                Err(error) => return Err(error),
            }
        }
        let path = format!("/1.0/instances/{}", encode(id.as_str()));
        match self.client.send_and_wait(Call::delete(path), self.operation_timeout).await {
            // An ephemeral instance deletes itself once stopped: gone after our stop is done.
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    async fn push_file(&self, id: &InstanceId, file: &PushFile) -> Result<()> {
        let call = |kind: &'static str, path: &str, mode: u32, body: Vec<u8>| Call {
            method: Method::POST,
            path: format!("/1.0/instances/{}/files?path={}", encode(id.as_str()), encode(path)),
            body,
            // Without it incusd 6.0 writes an empty file (it reads a form body otherwise).
            content_type: "application/octet-stream",
            headers: vec![
                // Octal, as a string: `0400`, not `256`.
                ("x-incus-mode", format!("{mode:04o}")),
                ("x-incus-uid", file.uid.to_string()),
                ("x-incus-gid", file.gid.to_string()),
                ("x-incus-type", kind.to_owned()),
                ("x-incus-write", "overwrite".to_owned()),
            ],
        };
        let content = file.content.expose().as_bytes().to_vec();
        match self.client.send(call("file", &file.path, file.mode, content.clone())).await {
            Ok(_) => return Ok(()),
            Err(Error::NotFound { .. }) => {}
            Err(error) => return Err(error),
        }
        // 404 is either a missing instance or a missing parent folder: tell them apart, then create the parent
        // (private to the file's owner) and push again. Only the direct parent is created: credential paths are
        // one folder deep on a tmpfs (`/run/ciscale/...`).
        self.get(id).await?;
        let parent = Path::new(&file.path).parent().and_then(Path::to_str).filter(|parent| !parent.is_empty());
        let Some(parent) = parent else {
            return Err(Error::Invalid {
                provider: PROVIDER.into(),
                message: format!("cannot push to `{}`", file.path),
            });
        };
        self.client.send(call("directory", parent, 0o700, Vec::new())).await?;
        self.client.send(call("file", &file.path, file.mode, content)).await.map(|_| ())
    }

    async fn exec(&self, id: &InstanceId, exec: &Exec) -> Result<ExecOutput> {
        let path = format!("/1.0/instances/{}/exec", encode(id.as_str()));
        let body = json!({
            "command": exec.command,
            "environment": exec.env,
            "wait-for-websocket": false,
            "interactive": false,
            // Output goes to log files on the host (deleted with the instance): no websocket to keep open, and
            // the agent's output can be read with `incus file pull` or the logs API when debugging.
            "record-output": true,
        });
        let reply = match self.client.send(Call::json(Method::POST, path, &body)).await {
            Ok(reply) => reply,
            Err(Error::NotFound { .. }) => return Err(Error::NotFound { what: format!("incus instance `{id}`") }),
            Err(error) => return Err(error),
        };
        let Reply::Async { operation } = reply else {
            return Err(Error::Other { provider: PROVIDER.into(), source: "exec did not start an operation".into() });
        };
        if !exec.wait {
            return Ok(ExecOutput { exit_code: None });
        }
        let metadata = self.client.wait(&operation, self.operation_timeout).await?;
        let exit_code = metadata.get("return").and_then(Value::as_i64).and_then(|code| i32::try_from(code).ok());
        Ok(ExecOutput { exit_code })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_statuses() {
        assert_eq!(state_of("Running"), InstanceState::Running);
        assert_eq!(state_of("Stopped"), InstanceState::Stopped);
        assert_eq!(state_of("Starting"), InstanceState::Pending);
        assert_eq!(state_of("Stopping"), InstanceState::Stopping);
        assert_eq!(state_of("Frozen"), InstanceState::Unknown);
        assert_eq!(state_of("Error"), InstanceState::Unknown);
    }

    #[test]
    fn reads_labels_and_attributes_from_an_instance_object() {
        let object = json!({
            "name": "builds-docker-1",
            "status": "Running",
            "created_at": "2026-01-01T11:30:00.123Z",
            "profiles": ["default", "docker"],
            "config": {
                "user.ciscale.owner": "builds",
                "user.ciscale.pool": "docker",
                "user.ciscale.image": "azure-agent",
                "limits.cpu": "4",
                "limits.memory": "8GiB",
                "volatile.base_image": "abc123",
                "image.os": "debian"
            },
            "devices": {}
        });
        let instance = instance_from_json(&object).expect("valid object");
        assert_eq!(instance.state, InstanceState::Running);
        assert_eq!(instance.owner(), Some("builds"));
        assert_eq!(instance.labels.get("ciscale.pool").map(String::as_str), Some("docker"));
        assert!(!instance.labels.contains_key("ciscale.image"), "the image alias is an attribute, not a label");
        assert_eq!(instance.attributes.get("image").map(String::as_str), Some("azure-agent"));
        assert_eq!(instance.attributes.get("cpu").map(String::as_str), Some("4"));
        assert_eq!(instance.attributes.get("limits.memory").map(String::as_str), Some("8GiB"));
        assert_eq!(instance.attributes.get("profiles").map(String::as_str), Some("default,docker"));
    }

    #[test]
    fn an_ephemeral_container_whose_stop_hook_ran_is_deleting_though_listed_running() {
        let object = |ephemeral: bool, power: &str| {
            json!({
                "name": "builds-docker-1",
                "status": "Running",
                "ephemeral": ephemeral,
                "created_at": "2026-01-01T11:30:00Z",
                "config": { "user.ciscale.owner": "builds", "volatile.last_state.power": power }
            })
        };
        let state = |value: &Value| instance_from_json(value).expect("valid object").state;
        assert_eq!(state(&object(true, "STOPPED")), InstanceState::Deleting);
        assert_eq!(state(&object(true, "RUNNING")), InstanceState::Running);
        assert_eq!(
            state(&object(false, "STOPPED")),
            InstanceState::Running,
            "a persistent container may be starting again: trust its status"
        );
        let mut fresh = object(true, "");
        fresh["config"] = json!({ "user.ciscale.owner": "builds" });
        assert_eq!(state(&fresh), InstanceState::Running, "a new container has no power state yet");
    }

    #[test]
    fn a_malformed_object_is_an_error_not_a_panic() {
        assert!(instance_from_json(&json!({ "status": "Running" })).is_err());
        assert!(instance_from_json(&json!({ "name": "x", "created_at": "yesterday" })).is_err());
    }
}
