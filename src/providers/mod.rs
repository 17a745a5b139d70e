//! The two provider traits ciscale talks to the world through, their shared error type, and the
//! implementations (one room per backend / CI source, plus in-memory fakes).
//!
//! Object-store style: small required method sets, request structs (so fields can be added without breaking
//! callers), and one `#[non_exhaustive]` error enum that retries and fallbacks decide on.
//!
//! # Adding a CI source
//! Adding a CI source is: its room, its config variant, its registry arm, its fake and its conformance run.
//! - **Its room**: `providers/<name>/`, a [`CiSource`] and its `CAPABILITIES` ([`CiCapabilities`]: drain,
//!   per-agent credentials, single-job, job-bound, its [`crate::model::Matching`] rule, its [`Launch`]). The
//!   planner, validation and apply read these, never the kind: a rule, a launch or job-bound planning that
//!   exists already is reused as it is.
//! - **Its config variant**: a `RawCiSource` variant (`config/raw.rs`), a `CiKind` variant (`model.rs`, whose
//!   exhaustive `secrets` and `name` make it say what its secrets are, so the one redactor cannot miss them) and
//!   its mapping with located checks in `config/validate.rs` (whose per-pool `match` over the kinds is
//!   exhaustive too). The JSON schema is generated (`CISCALE_UPDATE_SCHEMA=1`).
//! - **Its registry arm**: in `registry.rs`, `connect` and [`ci_capabilities`] (both exhaustive).
//! - **Its fake** (`tests/it/fakes/`, checked against the service's spec) and **its conformance run**
//!   (`tests/it/conformance.rs` on that fake), plus its kind in the exhaustive list of the redaction test
//!   (`tests/it/apply.rs`, which does not compile until it is there).
//!
//! Counted on Forgejo's wiring: outside its room it touched `config/raw.rs`, `model.rs`, `config/validate.rs`,
//! `providers/registry.rs` (and `config/mod.rs`, optionally, for the hint of its token variable). Forgejo was
//! also the first job-bound source, which added the generic job-bound planning once (`plan/jobs.rs`, the
//! `ciscale.job` label of a create in `plan/pool/scale_up.rs`, `RegisterAgent::for_job` in apply), and the first
//! that cannot drain, which taught the planner to delete an idle agent instead of draining it
//! (`plan/planner.rs`, `plan/preconditions.rs`); a later source with these capabilities (GitHub's cannot drain
//! either) reuses both as they are.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;

use crate::model::{
    AgentId, BackendName, BackendObservation, CiName, CiObservation, Instance, InstanceId, PoolName, Secret,
};

pub mod aws;
pub mod azure_pipelines;
pub mod cloud_config;
pub mod fake;
pub mod forgejo;
pub mod github;
pub mod hcloud;
pub(crate) mod http;
pub mod incus;
mod registry;
pub mod woodpecker;

pub use registry::{ci_capabilities, connect};

/// Every way a provider call can fail, in the terms retries and fallbacks decide on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    #[error("rate limited by {provider}{}", retry_after.map(|d| format!(", retry after {}s", d.as_secs())).unwrap_or_default())]
    RateLimited { provider: String, retry_after: Option<Duration> },
    #[error("{provider} refused the credentials: {message}")]
    Unauthenticated { provider: String, message: String },
    #[error("{provider} has no capacity: {message}")]
    Capacity { provider: String, message: String },
    #[error("{provider} is unavailable: {message}")]
    Unavailable { provider: String, message: String },
    #[error("{provider} rejected the request: {message}")]
    Invalid { provider: String, message: String },
    #[error("{provider} does not support {operation}")]
    Unsupported { provider: String, operation: &'static str },
    #[error("{provider}: {source}")]
    Other { provider: String, source: Box<dyn std::error::Error + Send + Sync> },
}

/// The text of an error whose own text held a secret, with the secret taken out (see [`Error::redacted`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RedactedError(pub String);

impl Error {
    /// The same error with every secret `redactor` knows taken out of its texts. The variant, and so every retry
    /// and fallback decision, stays; an [`Error::Other`] whose cause chain held a secret gets that chain as one
    /// redacted text instead.
    pub fn redacted(self, redactor: &crate::redact::Redactor) -> Error {
        let clean = |text: String| redactor.redact(&text);
        match self {
            Error::NotFound { what } => Error::NotFound { what: clean(what) },
            Error::AlreadyExists { what } => Error::AlreadyExists { what: clean(what) },
            Error::RateLimited { provider, retry_after } => Error::RateLimited { provider, retry_after },
            Error::Unauthenticated { provider, message } => {
                Error::Unauthenticated { provider, message: clean(message) }
            }
            Error::Capacity { provider, message } => Error::Capacity { provider, message: clean(message) },
            Error::Unavailable { provider, message } => Error::Unavailable { provider, message: clean(message) },
            Error::Invalid { provider, message } => Error::Invalid { provider, message: clean(message) },
            Error::Unsupported { provider, operation } => Error::Unsupported { provider, operation },
            Error::Other { provider, source } => {
                let chain = http::error_chain(source.as_ref());
                if redactor.leaks(&chain) {
                    Error::Other { provider, source: Box::new(RedactedError(redactor.redact(&chain))) }
                } else {
                    Error::Other { provider, source }
                }
            }
        }
    }

    /// Worth trying again later (the same request may succeed).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::RateLimited { .. } | Error::Unavailable { .. } | Error::Capacity { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What an instance should look like when created.
#[derive(Debug, Clone)]
pub struct CreateInstance {
    /// Deterministic per pool, so a create retried after a crash finds the first one (create-if-absent).
    pub name: String,
    pub pool: PoolName,
    /// Always carries `ciscale.owner` and `ciscale.pool`.
    pub labels: BTreeMap<String, String>,
    pub machine: BTreeMap<String, String>,
    /// Bootstrap payload (cloud-init user data etc.); may hold the agent's credential.
    pub user_data: Option<Secret>,
    /// Tells a retry of this create from a later life of the same name: the same value when the create is tried
    /// again (after a crash or a lost response), a new one for a new life where the caller can tell. Apply passes
    /// the id of the instance's CI agent record, which a retry finds again and a later life registers anew.
    /// Backends whose create takes an idempotency token (EC2's `ClientToken`) fold it in; others ignore it.
    pub attempt: Option<String>,
}

/// Which instances one list call should return.
#[derive(Debug, Clone, Default)]
pub struct ListInstances {
    /// Instances labelled `ciscale.owner=<owner>`.
    pub owner: String,
    /// Instances named explicitly in the config (start/stop mode), returned whatever their labels.
    pub adopted: Vec<InstanceId>,
    /// The `machine.image` values of the pools that create on this backend, sorted, without repeats. A backend
    /// that can check them cheaply (one call per cycle) reports the absent ones in
    /// [`BackendObservation::missing_images`]; the others ignore this.
    pub images: Vec<String>,
}

/// A file to place inside a container instance.
#[derive(Debug, Clone)]
pub struct PushFile {
    pub path: String,
    pub content: Secret,
    /// Octal permission bits, `0o400` for credentials.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone)]
pub struct Exec {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Wait for the command to finish and return its exit code; otherwise fire and forget.
    pub wait: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: Option<i32>,
}

/// What a backend can do beyond the required set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Files can be pushed and commands run inside instances (containers): the agent is started by exec and
    /// its credential pushed as a file. Otherwise the credential goes into the bootstrap user data.
    pub exec: bool,
    /// Stopped instances keep existing and can be started again.
    pub keeps_stopped: bool,
}

/// A place instances live: a cloud project/account or a container host.
///
/// # Contract
/// - `list` returns every instance labelled with the owner plus the adopted ids that exist, in one call per
///   account where the API allows it; never an unowned, unadopted instance.
/// - `create` is create-if-absent by name: creating a name that exists returns [`Error::AlreadyExists`].
/// - `start`, `stop` on an instance already in that state succeed; `delete` of a missing instance returns
///   [`Error::NotFound`], which callers treat as done.
/// - Implementations are cheap to clone behind an `Arc` and safe to call concurrently.
#[async_trait]
pub trait Backend: Send + Sync + Debug {
    fn kind(&self) -> &'static str;
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn observe(&self, request: &ListInstances) -> Result<BackendObservation>;
    async fn create(&self, request: &CreateInstance) -> Result<Instance>;
    async fn get(&self, id: &InstanceId) -> Result<Instance>;
    async fn start(&self, id: &InstanceId) -> Result<()>;
    async fn stop(&self, id: &InstanceId) -> Result<()>;
    async fn delete(&self, id: &InstanceId) -> Result<()>;
    async fn push_file(&self, _id: &InstanceId, _file: &PushFile) -> Result<()> {
        Err(Error::Unsupported { provider: self.kind().to_owned(), operation: "push_file" })
    }
    async fn exec(&self, _id: &InstanceId, _exec: &Exec) -> Result<ExecOutput> {
        Err(Error::Unsupported { provider: self.kind().to_owned(), operation: "exec" })
    }
}

/// Key in [`AgentCredential::env`] naming the variable the CI's agent reads its token from (Woodpecker:
/// `WOODPECKER_AGENT_SECRET`). The env stays secret-free: bootstrap writes the token under that name too.
pub const TOKEN_ENV_NAME_KEY: &str = "CISCALE_AGENT_TOKEN_ENV";

/// A freshly registered agent's own credential.
#[derive(Debug, Clone)]
pub struct AgentCredential {
    pub agent_id: AgentId,
    pub token: Secret,
    /// Environment the agent needs to reach its CI (`WOODPECKER_SERVER`, `AZP_URL`, ...), secret-free.
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct RegisterAgent {
    pub name: String,
    pub pool: PoolName,
    pub labels: BTreeMap<String, String>,
    /// The one queued job the agent is made for, as the CI names it in its queue, for a CI whose agents are
    /// bound to a job at registration ([`CiCapabilities::job_bound`]; Forgejo: the job's `handle`, which
    /// `forgejo-runner one-job --handle` takes, found in the task label
    /// [`forgejo::HANDLE_LABEL`](crate::providers::forgejo::HANDLE_LABEL)). `None`: any job the agent's labels
    /// match. Sources without the capability ignore it.
    pub for_job: Option<String>,
}

/// The wrapper a container image made by `ciscale provision` holds, for every CI so far ([`Launch`]).
pub const CONTAINER_AGENT_COMMAND: &str = "/usr/local/bin/ciscale-agent";

/// What a CI source can do beyond the required set, and how its agent is launched. The planner, config
/// validation and apply decide on these, never on the kind. Each room declares its own as a constant
/// (`CAPABILITIES`), which [`ci_capabilities`] finds for a config's kind and [`CiSource::capabilities`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CiCapabilities {
    /// `drain`/`undrain` work: the CI can be told to hand an agent no new jobs (Woodpecker `no_schedule`, Azure
    /// disabled). Without it they return [`Error::Unsupported`], and an agent is only removed when it is idle.
    pub drain: bool,
    /// `register` hands every agent a credential of its own, which deregistering it revokes (Woodpecker, Forgejo).
    /// Without it every agent gets the same shared credential (Azure: a PAT), which a machine keeps until it goes.
    pub per_agent_credentials: bool,
    /// Every agent runs one job and is then gone: the CI removes its record (Forgejo ephemeral runners), so a
    /// finished agent is replaced rather than reused.
    pub single_job: bool,
    /// `register` can bind the new agent to one queued job ([`RegisterAgent::for_job`]): the CI hands that
    /// agent that job and no other, so demand is met by one agent per waiting job.
    pub job_bound: bool,
    /// How the planner decides which pool's agents may take a job.
    pub matching: crate::model::Matching,
    /// How the agent is started on an instance when the pool says nothing more.
    pub launch: Launch,
}

impl CiCapabilities {
    /// Long-lived, drainable agents that take any matching job, each with its own credential, launched as a
    /// container image the pool names: what a source that declares nothing else gets.
    pub const LONG_LIVED: CiCapabilities = CiCapabilities {
        drain: true,
        per_agent_credentials: true,
        single_job: false,
        job_bound: false,
        matching: crate::model::Matching::LabelFilter,
        launch: Launch {
            agent: "CI",
            container_command: crate::providers::CONTAINER_AGENT_COMMAND,
            token_env: None,
            cloud: CloudLaunch::Docker { default_image: None, needs: "an image that runs the CI's agent from its env" },
        },
    };
}

/// How a CI source's agent starts on an instance.
///
/// In a container instance (a backend with [`Capabilities::exec`], Incus) the image (the pool's `machine.image`,
/// made by `ciscale provision` with the CI's provisioning script) holds a wrapper, [`Launch::container_command`],
/// which apply execs after pushing the credential as a 0400 env file (`apply::CREDENTIAL_PATH`); the wrapper
/// turns that file into whatever the CI's agent reads. On a cloud server (Hetzner, EC2) the user data does it
/// all, as [`CloudLaunch`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// The agent's name for messages: `Woodpecker`, `Azure Pipelines`, `Forgejo runner`.
    pub agent: &'static str,
    /// What apply execs in a container once the credential file is there (every CI so far:
    /// `/usr/local/bin/ciscale-agent`, the wrapper its provisioning script installs).
    pub container_command: &'static str,
    /// The variable the CI's own agent reads its credential from (`WOODPECKER_AGENT_SECRET`, `AZP_TOKEN`):
    /// a cloud server runs the CI's stock agent, with no ciscale wrapper to translate, so the env file carries
    /// the token under this name too. `None`: only the name the credential announces (`CISCALE_AGENT_TOKEN_ENV`).
    pub token_env: Option<&'static str>,
    pub cloud: CloudLaunch,
}

/// What a cloud server's user data runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudLaunch {
    /// cloud-init installs Docker and runs an agent container with the credential as its env file
    /// (`apply::cloud_init`). The pool's `agent.image`, else `default_image`; with neither a pool cannot run on a
    /// cloud, and `needs` says what its image must do.
    Docker { default_image: Option<&'static str>, needs: &'static str },
    /// The source writes the whole user data itself ([`CiSource::cloud_user_data`]): Forgejo downloads a pinned
    /// runner release, checked by its SHA-256, and runs one job as an unprivileged user.
    OwnUserData,
}

/// What a verified webhook delivery asks of the loop ([`CiSource::receive_webhook`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookNotice {
    /// Run a cycle now: the delivery changes what is needed (a job waits, or one finished).
    pub wake: bool,
    /// For the log and the trigger: `workflow_job queued in acme/app`.
    pub reason: String,
}

/// A refused webhook delivery: the HTTP status to answer and why. Never holds a secret, a signature or the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("webhook delivery refused ({status}): {message}")]
pub struct WebhookRefusal {
    pub status: u16,
    pub message: String,
}

/// Which past jobs [`CiSource::history`] returns: those queued in `[from, until)`.
#[derive(Debug, Clone)]
pub struct HistoryRequest {
    pub from: Timestamp,
    pub until: Timestamp,
    /// A rate limit that lifts within this long is waited out and the reading goes on; a longer one (or one
    /// that names no wait) fails the history. A long history can spend a whole hourly budget (GitHub: about one
    /// request per workflow run), and failing then would throw away everything read so far.
    pub rate_limit_wait: Duration,
}

/// A job a CI source ran (or is running), as its history tells it: what `ciscale trace export` turns into a
/// trace line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastJob {
    /// How the CI names it, for humans (`acme/app#42/build`, an Azure request id).
    pub id: String,
    /// When it could first run: queued, its dependencies done, its approval given.
    pub queued_at: Timestamp,
    /// When an agent took it; `None`: never (cancelled while queued, or still waiting).
    pub started_at: Option<Timestamp>,
    /// When it ended; `None`: still running, or never started.
    pub finished_at: Option<Timestamp>,
    /// What it asked for in the CI's own terms (Woodpecker task labels, including `repo` and `org-id`).
    pub labels: BTreeMap<String, String>,
    /// Azure demands.
    pub demands: Vec<String>,
}

/// A CI server: where the queue is read and agents are registered.
///
/// # Contract
/// - `observe` returns the queue and every agent in as few calls as the API allows.
/// - `register` is create-if-absent by name: registering an existing name returns that agent with a fresh
///   credential where the CI allows it.
/// - `drain`/`undrain` are idempotent where [`CiCapabilities::drain`] says so, else [`Error::Unsupported`];
///   `deregister` of a missing agent returns [`Error::NotFound`].
/// - `history` (optional: [`Error::Unsupported`] by default) returns the jobs queued in the request's window,
///   oldest first, as far as the CI keeps them; it is read once by `ciscale trace export`, never by a cycle.
#[async_trait]
pub trait CiSource: Send + Sync + Debug {
    fn kind(&self) -> &'static str;
    fn capabilities(&self) -> CiCapabilities {
        CiCapabilities::LONG_LIVED
    }
    /// The user data of a cloud server that runs one agent with the env file `env_file` (the credential as
    /// apply writes it), for a source whose launch is [`CloudLaunch::OwnUserData`].
    fn cloud_user_data(&self, _env_file: &Secret) -> Result<Secret> {
        Err(Error::Unsupported { provider: self.kind().to_owned(), operation: "cloud_user_data" })
    }
    /// The largest webhook body the source reads, when it takes webhooks (the listener stops reading past it
    /// and answers 413); `None`: it takes none.
    fn webhook_max_body(&self) -> Option<usize> {
        None
    }
    /// A webhook delivery (its headers and raw body) for this source: verified (a source never reads an
    /// unverified body), read, and turned into what the loop should do. `Err`: the status to answer.
    fn receive_webhook(
        &self,
        _headers: &reqwest::header::HeaderMap,
        _body: &[u8],
    ) -> std::result::Result<WebhookNotice, WebhookRefusal> {
        Err(WebhookRefusal { status: 404, message: format!("ci source kind `{}` takes no webhooks", self.kind()) })
    }
    async fn observe(&self) -> Result<CiObservation>;
    async fn register(&self, request: &RegisterAgent) -> Result<AgentCredential>;
    /// Stop the agent taking new jobs. A source that cannot drain (`capabilities().drain` false: GitHub, Forgejo)
    /// keeps this default; the conformance suite holds every source to what its capabilities say.
    async fn drain(&self, _id: &AgentId) -> Result<()> {
        Err(Error::Unsupported { provider: self.kind().to_owned(), operation: "drain" })
    }
    /// Undo [`Self::drain`]; a source that cannot drain has nothing to undo, and answers as it does for drain.
    async fn undrain(&self, _id: &AgentId) -> Result<()> {
        Err(Error::Unsupported { provider: self.kind().to_owned(), operation: "undrain" })
    }
    async fn deregister(&self, id: &AgentId) -> Result<()>;
    async fn history(&self, _request: &HistoryRequest) -> Result<Vec<PastJob>> {
        Err(Error::Unsupported { provider: self.kind().to_owned(), operation: "job history" })
    }
}

/// The live providers a config names, by the names the config gives them.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    pub backends: BTreeMap<BackendName, Arc<dyn Backend>>,
    pub ci: BTreeMap<CiName, Arc<dyn CiSource>>,
}
