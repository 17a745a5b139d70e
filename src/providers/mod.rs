//! The two provider traits ciscale talks to the world through, their shared error type, and the
//! implementations (one room per backend / CI source, plus in-memory fakes).
//!
//! Object-store style: small required method sets, request structs (so fields can be added without breaking
//! callers), and one `#[non_exhaustive]` error enum that retries and fallbacks decide on.

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
pub mod fake;
pub mod forgejo;
pub mod hcloud;
pub(crate) mod http;
pub mod incus;
mod registry;
pub mod woodpecker;

pub use registry::connect;

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

impl Error {
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

/// What a CI source can do beyond the required set. The planner and apply decide on these, never on the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CiCapabilities {
    /// `drain`/`undrain` work: the CI can be told to hand an agent no new jobs (Woodpecker `no_schedule`, Azure
    /// disabled). Without it they return [`Error::Unsupported`], and an agent is only removed when it is idle.
    pub drain: bool,
    /// Every agent runs one job and is then gone: the CI removes its record (Forgejo ephemeral runners), so a
    /// finished agent is replaced rather than reused.
    pub single_job: bool,
    /// `register` can bind the new agent to one queued job ([`RegisterAgent::for_job`]): the CI hands that
    /// agent that job and no other, so demand is met by one agent per waiting job.
    pub job_bound: bool,
}

impl CiCapabilities {
    /// What Woodpecker and Azure Pipelines agents are: long-lived, drainable, taking any matching job.
    pub const LONG_LIVED: CiCapabilities = CiCapabilities { drain: true, single_job: false, job_bound: false };
}

/// Which past jobs [`CiSource::history`] returns: those queued in `[from, until)`.
#[derive(Debug, Clone)]
pub struct HistoryRequest {
    pub from: Timestamp,
    pub until: Timestamp,
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
    async fn observe(&self) -> Result<CiObservation>;
    async fn register(&self, request: &RegisterAgent) -> Result<AgentCredential>;
    async fn drain(&self, id: &AgentId) -> Result<()>;
    async fn undrain(&self, id: &AgentId) -> Result<()>;
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
