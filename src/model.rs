//! The shared vocabulary: what the user wants ([`Desired`]), what the world looks like ([`Observed`]), and the
//! small value types both are made of (ids, owner labels, a job's shared [`Labels`], durations, secrets).
//!
//! `Desired` is produced by `config` and never serialised (it holds secrets). `Observed` is plain data that
//! round-trips through YAML and JSON, so `ciscale observe -o state.yaml` and `plan --observed state.yaml` work
//! with no network at all.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

mod labels;
pub use labels::{Label, LabelInterner, Labels};

/// Label/tag key naming the config that owns a resource. Nothing without it (or with another value) is touched.
pub const OWNER_LABEL: &str = "ciscale.owner";
/// Label/tag key naming the pool a resource belongs to.
pub const POOL_LABEL: &str = "ciscale.pool";
/// Label/tag key holding a digest of the agent settings an instance was created with (spec drift detection).
pub const AGENT_HASH_LABEL: &str = "ciscale.agent-hash";
/// Label/tag key naming the id of the CI agent record an instance runs, written when ciscale creates it. It links
/// the instance to its agent when the agent is not named after the instance (a pre-registered agent), so an
/// orphaned instance is never deleted under a busy agent. Instances from before it was written lack it.
pub const AGENT_LABEL: &str = "ciscale.agent";
/// Label a CI agent is registered with when it runs one job and then powers its instance off (ephemeral pools).
pub const EPHEMERAL_LABEL: &str = "ciscale.ephemeral";
/// Task and agent label naming the one job an agent is bound to, for CI sources whose agents serve exactly the job
/// they were registered for (`providers::CiCapabilities::job_bound`; Forgejo: the job's handle). On a task: its
/// own; on an agent: the job it was made for; on a create (`label.ciscale.job` in the change's `after`, and so on
/// the instance): the job apply registers the agent for.
pub const JOB_LABEL: &str = "ciscale.job";
/// Task (and agent) label naming the Azure Pipelines agent pool a job request waits in: a request counts only
/// for pools bound to that Azure pool, whatever its demands.
pub const AZURE_POOL_LABEL: &str = "azure-pool";

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_owned())
            }
        }
        impl From<String> for $name {
            fn from(value: String) -> Self {
                Self(value)
            }
        }
    };
}

id_newtype!(
    /// Name of a pool in the config.
    PoolName
);
id_newtype!(
    /// Provider-side id of an instance (Hetzner server id, EC2 instance id, Incus instance name, ...).
    InstanceId
);
id_newtype!(
    /// CI-side id of an agent record.
    AgentId
);
id_newtype!(
    /// Name of a backend account in the config (`backends:` key).
    BackendName
);
id_newtype!(
    /// Name of a CI source in the config (`ci:` key).
    CiName
);
id_newtype!(
    /// CI-side id of a task/job.
    TaskId
);

// ---------------------------------------------------------------------------------------------------------------
// Durations and secrets
// ---------------------------------------------------------------------------------------------------------------

/// A non-negative duration written in Go's form (`10s`, `30m`, `1h30m`), as Picus and Woodpecker users write it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(pub std::time::Duration);

impl GoDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }
    pub fn as_secs(&self) -> u64 {
        self.0.as_secs()
    }
    pub fn signed(&self) -> jiff::SignedDuration {
        jiff::SignedDuration::try_from(self.0).unwrap_or(jiff::SignedDuration::MAX)
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration `{input}`: {why}")]
pub struct DurationError {
    pub input: String,
    pub why: String,
}

impl FromStr for GoDuration {
    type Err = DurationError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |why: &str| DurationError { input: input.to_owned(), why: why.to_owned() };
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(fail("empty; write e.g. `10s`, `30m` or `1h30m`"));
        }
        // Go accepts a bare `0`; jiff wants a unit.
        if trimmed == "0" {
            return Ok(Self::default());
        }
        // Go's units only: days and longer are calendar units there and are rejected, so we reject them too.
        if trimmed.chars().any(|c| matches!(c, 'd' | 'w' | 'y' | 'M' | 'D' | 'W' | 'Y')) {
            return Err(fail("units are `h`, `m`, `s`, `ms`, `us`, `ns`"));
        }
        if !trimmed.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            return Err(fail("must start with a number, e.g. `10s`"));
        }
        let signed: jiff::SignedDuration =
            trimmed.parse().map_err(|_| fail("expected Go form like `10s`, `30m` or `1h30m`"))?;
        let std = std::time::Duration::try_from(signed).map_err(|_| fail("must not be negative"))?;
        Ok(Self(std))
    }
}

impl fmt::Display for GoDuration {
    /// Go's own `time.Duration.String()` shape, trimmed of zero parts: `1h30m`, `45s`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.0.as_secs();
        let millis = self.0.subsec_millis();
        if total == 0 && millis == 0 {
            return f.write_str("0s");
        }
        let (hours, minutes, seconds) = (total / 3600, (total % 3600) / 60, total % 60);
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        if seconds > 0 || (hours == 0 && minutes == 0 && millis == 0) {
            write!(f, "{seconds}s")?;
        }
        if millis > 0 {
            write!(f, "{millis}ms")?;
        }
        Ok(())
    }
}

impl fmt::Debug for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GoDuration({self})")
    }
}

impl Serialize for GoDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for GoDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GoDuration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration in Go form: `10s`, `30m`, `1h30m`.",
            "pattern": "^([0-9]+(\\.[0-9]+)?(h|m|s|ms|us|µs|ns))+$|^0$"
        })
    }
}

/// A secret value (token, PAT, password). It cannot be printed: `Debug` and `Display` show `***`, and it has no
/// `Serialize`, so it can never end up in a plan, a plan file or an observation.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The only way to read the value: call sites that do are the places secrets leave ciscale.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Desired state
// ---------------------------------------------------------------------------------------------------------------

/// The validated config: everything the planner and the executor need to know about what the user wants.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Owner id: the value of the `ciscale.owner` label on every resource this config creates.
    pub owner: String,
    pub poll_interval: GoDuration,
    pub ci: BTreeMap<CiName, CiSourceSpec>,
    pub backends: BTreeMap<BackendName, BackendSpec>,
    /// In config order: a pending job is counted for the first pool (in this order) that matches it.
    pub pools: Vec<PoolSpec>,
    pub images: BTreeMap<String, ImageSpec>,
    /// Digest of the config's meaning (not its bytes), recorded in plan files to detect a changed config.
    pub config_hash: String,
    /// Where `watch` serves `/metrics` and `/healthz`; `None`: not served.
    pub metrics: Option<MetricsSpec>,
}

/// The daemon's metrics and health endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSpec {
    pub listen: std::net::SocketAddr,
    /// `/healthz` fails once no cycle has succeeded for this many poll intervals [3].
    pub unhealthy_after: u32,
}

impl Desired {
    pub fn pool(&self, name: &PoolName) -> Option<&PoolSpec> {
        self.pools.iter().find(|pool| &pool.name == name)
    }

    /// Every secret the config holds: each CI source's and backend's ([`CiKind::secrets`],
    /// [`BackendKind::secrets`]) and each pool's `secret_env`. What [`crate::redact::Redactor`] takes out of text.
    pub fn secrets(&self) -> impl Iterator<Item = &Secret> {
        let ci = self.ci.values().flat_map(|source| source.kind.secrets());
        let backends = self.backends.values().flat_map(|backend| backend.kind.secrets());
        let pools = self.pools.iter().flat_map(|pool| pool.agent.secret_env.values());
        ci.chain(backends).chain(pools)
    }
}

/// A CI server ciscale reads the queue from and registers agents with.
#[derive(Debug, Clone, PartialEq)]
pub struct CiSourceSpec {
    pub kind: CiKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CiKind {
    Woodpecker {
        server: String,
        token: Secret,
        /// gRPC address agents connect to (`WOODPECKER_SERVER`); `None`: the host of `server`, port 9000.
        grpc_address: Option<String>,
    },
    AzurePipelines {
        organization_url: String,
        pat: Secret,
        /// The PAT handed to agents for their self-registration (`config.sh --token`); `None`: the source's own
        /// `pat` is handed out (Azure has no per-agent tokens; see `providers::azure_pipelines`).
        agent_pat: Option<Secret>,
    },
    /// GitHub Actions (github.com or GitHub Enterprise Server); see `providers::github`.
    Github(GithubSpec),
    /// A Forgejo instance's Actions (Forgejo 15 and later).
    Forgejo {
        server: String,
        token: Secret,
        scope: ForgejoScope,
        /// The URL runners reach Forgejo at; `None`: `server`.
        runner_url: Option<String>,
        /// The forgejo-runner release cloud servers download; `None`: pools of the source run in containers.
        runner_release: Option<RunnerReleaseSpec>,
    },
    /// The in-memory fake (tests, demos, offline trials).
    Fake(FakeSpec),
}

/// A GitHub Actions source, as the config gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct GithubSpec {
    /// The API root; `None`: `https://api.github.com` (GitHub Enterprise Server: `https://HOST/api/v3`).
    pub endpoint: Option<String>,
    pub scope: GithubScope,
    pub auth: GithubAuth,
    /// The runner group new runners join (organisation and enterprise scopes), by name or number; `None`: the
    /// default group.
    pub runner_group: Option<String>,
    /// The repositories whose queues are read (`owner/name`); `None`: the scope's own (see `providers::github`).
    pub repositories: Option<Vec<String>>,
    /// Quiet repositories polled per cycle (a rotation, for large organisations); `None`: all of them.
    pub repositories_per_cycle: Option<u32>,
    /// The secret `workflow_job` webhooks are signed with; `None`: the source takes no webhooks.
    pub webhook_secret: Option<Secret>,
    /// The runners' machines are 64-bit ARM (`arch: arm64`), not x86-64.
    pub arm64: bool,
}

/// Where a GitHub source's runners are registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GithubScope {
    /// `owner/name`.
    Repository(String),
    Organization(String),
    Enterprise(String),
}

/// How a GitHub source authenticates.
#[derive(Debug, Clone, PartialEq)]
pub enum GithubAuth {
    /// A GitHub App installation: the app's id (or client id), the installation's id and the app's private key
    /// (PEM).
    App { app_id: String, installation_id: u64, private_key: Secret },
    /// A personal access token (fine-grained or classic).
    Token(Secret),
}

/// Whose Forgejo jobs and runners a source serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForgejoScope {
    /// Every repository of the instance (a site administrator's token).
    Instance,
    Organization(String),
    Repository {
        owner: String,
        repo: String,
    },
    /// The repositories of the token's own user.
    User,
}

/// A pinned forgejo-runner release (validated: 12.8 or later, a SHA-256 digest, `amd64` or `arm64`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerReleaseSpec {
    pub version: String,
    pub sha256: String,
    pub arch: String,
}

/// Settings of the in-memory fake world shared by the fake backend and the fake CI.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FakeSpec {
    /// Persist the fake world in this JSON file so separate `ciscale` runs (and tests) share it. A fake backend
    /// and a fake CI source naming the same file share one world.
    pub state_file: Option<std::path::PathBuf>,
    /// Play the CI's part on every observation: agents of running instances check in, take matching pending
    /// jobs, and finish them. Off: the world changes only when a test changes it.
    pub simulate: bool,
    /// Made-up jobs arriving as time passes (CI side, with `simulate`), for demos.
    pub jobs: Option<JobFeed>,
}

/// Jobs the fake CI makes up: those of a synthetic trace (`crate::simulate::synthetic`) as their time comes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFeed {
    /// The synthetic profile's name (`demo`, `office-week`, `nightly-burst`), checked by the config.
    pub profile: String,
    pub seed: u64,
}

impl CiKind {
    /// The source's own credentials. Exhaustive on purpose (no `_` arm): a new kind must say what its secrets
    /// are, or nothing would redact them.
    pub fn secrets(&self) -> Vec<&Secret> {
        match self {
            CiKind::Woodpecker { token, server: _, grpc_address: _ } => vec![token],
            CiKind::AzurePipelines { pat, agent_pat, organization_url: _ } => {
                std::iter::once(pat).chain(agent_pat.as_ref()).collect()
            }
            CiKind::Github(GithubSpec {
                auth,
                webhook_secret,
                endpoint: _,
                scope: _,
                runner_group: _,
                repositories: _,
                repositories_per_cycle: _,
                arm64: _,
            }) => {
                let credential = match auth {
                    GithubAuth::App { private_key, app_id: _, installation_id: _ } => private_key,
                    GithubAuth::Token(token) => token,
                };
                std::iter::once(credential).chain(webhook_secret.as_ref()).collect()
            }
            CiKind::Forgejo { token, server: _, scope: _, runner_url: _, runner_release: _ } => vec![token],
            CiKind::Fake(_) => Vec::new(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            CiKind::Woodpecker { .. } => "woodpecker",
            CiKind::AzurePipelines { .. } => "azure-pipelines",
            CiKind::Github(_) => "github",
            CiKind::Forgejo { .. } => "forgejo",
            CiKind::Fake(_) => "fake",
        }
    }
}

/// A cloud account / container host ciscale creates instances in.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSpec {
    pub kind: BackendKind,
    /// How the backend bills; drives billing-aware teardown.
    pub billing: Billing,
    /// How fast `watch` may create instances here; `None`: no limit.
    pub create_limit: Option<CreateLimit>,
    /// How long one change on this backend may run before it is abandoned; `None`: the default for the kind
    /// (`apply::default_change_timeout`).
    pub change_timeout: Option<GoDuration>,
}

/// A token bucket on creates: `rate.count` creates per `rate.per` on average, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateLimit {
    pub rate: CreateRate,
    /// Creates allowed back to back after a quiet spell [the rate's count].
    pub burst: u32,
}

/// A rate written `10/m`: `count` creates per `per` (`s`, `m`, `h`, or a Go duration such as `10/30s`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CreateRate {
    pub count: u32,
    pub per: std::time::Duration,
}

impl FromStr for CreateRate {
    type Err = String;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let Some((count, per)) = input.split_once('/') else {
            return Err("it has no `/` between the count and the period".to_owned());
        };
        let count: u32 = count.trim().parse().map_err(|_| format!("`{}` is not a whole number", count.trim()))?;
        if count == 0 {
            return Err("the count must be at least 1".to_owned());
        }
        let per = match per.trim() {
            "s" | "sec" | "second" => std::time::Duration::from_secs(1),
            "m" | "min" | "minute" => std::time::Duration::from_secs(60),
            "h" | "hour" => std::time::Duration::from_secs(3600),
            other if other.starts_with(|c: char| c.is_ascii_digit()) => {
                other.parse::<GoDuration>().map_err(|error| error.why)?.0
            }
            other => return Err(format!("`{other}` is not a period: `s`, `m`, `h` or a duration such as `30s`")),
        };
        if per.is_zero() {
            return Err("the period must be longer than zero".to_owned());
        }
        Ok(Self { count, per })
    }
}

impl fmt::Display for CreateRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per.as_secs() {
            1 if self.per.subsec_nanos() == 0 => write!(f, "{}/s", self.count),
            60 if self.per.subsec_nanos() == 0 => write!(f, "{}/m", self.count),
            3600 if self.per.subsec_nanos() == 0 => write!(f, "{}/h", self.count),
            _ => write!(f, "{}/{}", self.count, GoDuration(self.per)),
        }
    }
}

impl fmt::Debug for CreateRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CreateRate({self})")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum BackendKind {
    Hcloud { token: Secret, endpoint: Option<String> },
    Aws { region: Option<String>, endpoint: Option<String> },
    Incus { socket: Option<String>, project: Option<String> },
    Fake(FakeSpec),
}

impl BackendKind {
    /// The backend's own credentials; exhaustive like [`CiKind::secrets`]. EC2 takes its credentials from the
    /// environment's chain (never from the config), Incus from its socket's permissions.
    pub fn secrets(&self) -> Vec<&Secret> {
        match self {
            BackendKind::Hcloud { token, endpoint: _ } => vec![token],
            BackendKind::Aws { region: _, endpoint: _ } => Vec::new(),
            BackendKind::Incus { socket: _, project: _ } => Vec::new(),
            BackendKind::Fake(_) => Vec::new(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            BackendKind::Hcloud { .. } => "hcloud",
            BackendKind::Aws { .. } => "aws",
            BackendKind::Incus { .. } => "incus",
            BackendKind::Fake(_) => "fake",
        }
    }
}

/// Billing granularity of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Billing {
    /// Billed per started hour (Hetzner): an idle instance is kept until its paid hour is nearly over.
    Hourly,
    /// Billed per second or not at all (EC2, Incus): an idle instance goes as soon as its idle timeout passes.
    PerSecond,
}

/// One pool of identical agents.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub name: PoolName,
    pub ci: CiBinding,
    pub backend: BackendBinding,
    pub agent: AgentSpec,
    pub scale: ScalePolicy,
}

/// Which CI source feeds the pool and what its agents offer to that source's jobs. The shape is the same for
/// every CI; what it means is the source's [`Matching`] rule, which the planner applies to it and to each job's
/// [`Task`] (`plan::matching`).
#[derive(Debug, Clone, PartialEq)]
pub struct CiBinding {
    pub source: CiName,
    /// The labels the agents are registered with and offer: Woodpecker agent labels (`key: value`, `key: "*"`,
    /// `"!key": value`), Forgejo runner labels (`name: how`), and for Azure the agent pool as
    /// [`AZURE_POOL_LABEL`] (the config's `azurePool`).
    pub labels: BTreeMap<String, String>,
    /// Capabilities the agents offer (`name` or `name=value`), matched against job demands (Azure, the fake).
    pub capabilities: BTreeMap<String, String>,
}

/// How a CI source decides which agent may take a job, declared by the source's room
/// (`providers::CiCapabilities::matching`) and applied by the planner to a pool's [`CiBinding`] and a job's
/// [`Task`]. Named by the rule, not by the CI, so a new source reuses a rule where its CI's is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    /// Key/value filters (Woodpecker's `MatchLabels`): every job label must be offered with its value or `*`,
    /// and every offered `!key` must be on the job with that value.
    LabelFilter,
    /// Demands against capabilities (Azure Pipelines), within the agent pool the job waits in (the job's and the
    /// pool's [`AZURE_POOL_LABEL`]).
    PoolDemands,
    /// A label set (`runs-on` of Forgejo and GitHub Actions): every label the job demands must be among the names
    /// of the offered labels; `case_insensitive` as the CI compares them.
    LabelSet { case_insensitive: bool },
    /// [`Matching::LabelFilter`] and demands against capabilities at once (the fake CI speaks both).
    LabelFilterAndDemands,
}

/// Where and how the pool's instances run.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendBinding {
    pub backend: BackendName,
    pub mode: InstanceMode,
    /// Provider-specific machine attributes (server type, image, location, limits, ...). Ordered candidate lists
    /// are comma-separated (`serverType: cx22,cx32`): the first is the one compared for drift.
    pub machine: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceMode {
    /// ciscale creates and deletes instances.
    Create,
    /// The instances exist already (named by id, with their agent); ciscale only starts and stops them.
    StartStop { instances: Vec<AdoptedInstance> },
}

/// An instance ciscale does not create but is allowed to start and stop (Picus's model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptedInstance {
    pub id: InstanceId,
    /// The CI agent that runs on it, when its name differs from the instance's name.
    pub agent: Option<AgentRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRef {
    Id(AgentId),
    Name(String),
}

/// What runs on each instance.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSpec {
    /// Agent container image or package reference.
    pub image: Option<String>,
    /// Plain environment (shown in plans, part of the drift digest).
    pub env: BTreeMap<String, String>,
    /// Secret environment (never shown, not part of the drift digest).
    pub secret_env: BTreeMap<String, Secret>,
    /// Picus mode: every instance of the pool runs this one agent, registered by hand with a shared secret (in
    /// `secret_env`). ciscale neither registers nor deregisters it; it drains it before a delete and undrains it
    /// after a create. Only for pools of at most one instance.
    pub preregistered: Option<AgentRef>,
}

/// Scale policy of a pool. Defaults in brackets.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePolicy {
    /// Never fewer instances [0].
    pub min: u32,
    /// Never more instances, counting in-flight creates [1].
    pub max: u32,
    /// Idle agents kept warm on top of the demand [0].
    pub min_idle: u32,
    /// Jobs one agent runs at once [1].
    pub jobs_per_agent: u32,
    /// An agent idle this long is drained and removed [30m].
    pub idle_timeout: GoDuration,
    /// Agents run one job and go away; gone ones are replaced [false].
    pub ephemeral: bool,
    /// An instance whose agent has not contacted the CI within this long after creation is replaced [10m].
    pub bootstrap_timeout: GoDuration,
    /// On hourly-billed backends, keep an idle instance until this long before its paid hour ends; `None`
    /// disables billing-aware teardown [Some(5m) on hourly backends].
    pub billing_margin: Option<GoDuration>,
    /// Time windows that override `min`, `max` and `min_idle`; the first window containing "now" wins [none].
    pub schedule: Vec<ScheduleWindow>,
    /// `watch` stops creating in this pool after this many creates in a row failed; 0 never stops [5].
    pub breaker_threshold: u32,
    /// How long it stops before trying one create again [5m].
    pub breaker_cooldown: GoDuration,
}

/// A recurring time window in which a pool's bounds differ (e.g. weekdays 08–18 in Berlin: keep 2 warm).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleWindow {
    /// Shown in the plan when the window is active.
    pub name: String,
    /// The minutes that belong to the window, as a cron pattern (`* 8-17 * * 1-5` = every minute from 08:00 to
    /// 17:59, Monday to Friday), read in `timezone`.
    pub cron: CronPattern,
    pub timezone: jiff::tz::TimeZone,
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub min_idle: Option<u32>,
}

impl ScheduleWindow {
    /// Whether `now` falls in the window: its minute, on the wall clock of the window's time zone, matches the
    /// pattern. Daylight-saving changes are handled by the time zone: 08:00 is 08:00 local in summer and winter.
    pub fn contains(&self, now: Timestamp) -> bool {
        // The minute `now` falls in: croner also compares seconds, which a 5-field pattern fixes at 0, so 08:30:30
        // would otherwise be outside `* 8-16 * * *` (and a window would only hold for cycles on a whole minute).
        let minute = Timestamp::from_second(now.as_second().div_euclid(60) * 60).unwrap_or(now);
        let local = minute.to_zoned(self.timezone.clone());
        self.cron.parsed.is_time_matching(&local).unwrap_or(false)
    }
}

/// A parsed cron pattern that remembers how it was written.
#[derive(Debug, Clone)]
pub struct CronPattern {
    pub text: String,
    parsed: croner::Cron,
}

impl CronPattern {
    /// Exactly five fields: a window is a set of minutes, so seconds and years have no place in it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let fields = text.split_whitespace().count();
        if fields != 5 {
            return Err(format!("it has {fields} fields, a schedule window needs 5"));
        }
        let parsed: croner::Cron = text
            .parse()
            .map_err(|error: croner::errors::CronError| error.to_string().trim_end_matches('.').to_lowercase())?;
        Ok(Self { text: text.to_owned(), parsed })
    }
}

impl PartialEq for CronPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Default for ScalePolicy {
    fn default() -> Self {
        Self {
            min: 0,
            max: 1,
            min_idle: 0,
            jobs_per_agent: 1,
            idle_timeout: GoDuration::from_secs(30 * 60),
            ephemeral: false,
            bootstrap_timeout: GoDuration::from_secs(10 * 60),
            billing_margin: Some(GoDuration::from_secs(5 * 60)),
            schedule: Vec::new(),
            breaker_threshold: 5,
            breaker_cooldown: GoDuration::from_secs(5 * 60),
        }
    }
}

/// A base image `ciscale provision` builds.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    pub backend: BackendName,
    pub base: String,
    pub scripts: Vec<std::path::PathBuf>,
    pub keep: u32,
    /// URL of the CI agent tarball; provisioning scripts get it as `AGENT_URL`.
    pub agent_url: Option<String>,
}

// ---------------------------------------------------------------------------------------------------------------
// Actions and their targets (the plan's vocabulary, shared with the observation's work in flight)
// ---------------------------------------------------------------------------------------------------------------

/// The small closed set of things apply can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Register an agent, create an instance with its credential, start the agent.
    Create,
    /// Start a stopped instance (or resume a drained one): start → undrain.
    Start,
    /// Stop an instance whose agent is drained and idle: stop (the instance and its agent record stay).
    Stop,
    /// Tell the CI to give the agent no new jobs; the instance goes on a later cycle once idle.
    Drain,
    /// Delete an instance whose agent is drained and idle (or that has no agent): delete → deregister.
    Delete,
    /// Spec drift on an idle, drained agent: delete → deregister → create with the pool's current spec.
    Replace,
    /// Remove a CI agent record that has no instance.
    Deregister,
}

impl Action {
    pub fn symbol(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Start => ">",
            Action::Stop => "<",
            Action::Drain => "~",
            Action::Delete => "-",
            Action::Replace => "-/+",
            Action::Deregister => "x",
        }
    }

    pub fn verb(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Drain => "drain",
            Action::Delete => "delete",
            Action::Replace => "replace",
            Action::Deregister => "deregister",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.verb())
    }
}

/// An instance a change acts on. `id` is `None` for an instance that does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceTarget {
    pub backend: BackendName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<InstanceId>,
    pub name: String,
}

/// A CI agent record a change acts on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AgentTarget {
    pub ci: CiName,
    pub id: AgentId,
    pub name: String,
}

// ---------------------------------------------------------------------------------------------------------------
// Observed state
// ---------------------------------------------------------------------------------------------------------------

/// Everything ciscale saw in one observation, from every backend account and CI source the config names.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observed {
    pub observed_at: Timestamp,
    #[serde(default)]
    pub backends: BTreeMap<BackendName, BackendObservation>,
    #[serde(default)]
    pub ci: BTreeMap<CiName, CiObservation>,
    /// Work ciscale started earlier and has not seen finish (filled by the `watch` loop, whose changes outlive
    /// the cycle that planned them). The planner plans nothing new on these targets and counts their creates
    /// towards `max`. Empty for one-shot `plan`/`apply` and in observation files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_flight: Vec<InFlight>,
}

/// One change that is being carried out right now: its pool, action and targets, and since when.
///
/// What the planner makes of it:
/// - its instance target (by id when known, else by backend and name) and its agent target (by CI and id) get
///   no new change until the work is gone from this list;
/// - a `create` (or `replace`, or `start`) counts as a serving instance of its pool, and a `create` whose
///   instance the backend does not list yet still counts towards the pool's `max` and keeps its name taken;
/// - `since` is for humans (notes, `observe` output): the planner never times work in flight out, the loop
///   that runs it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InFlight {
    pub pool: PoolName,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentTarget>,
    /// When the first step of the change started.
    pub since: Timestamp,
}

/// What one backend account holds: the owned (or adopted) instances and the price list.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendObservation {
    #[serde(default)]
    pub instances: Vec<Instance>,
    /// Hourly price per machine type (e.g. Hetzner server type), for the plan's cost line.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prices: BTreeMap<String, Price>,
    /// Images the pools on this backend create from ([`ListInstances::images`](crate::providers::ListInstances))
    /// that the backend does not have (an Incus image alias not yet built by `ciscale provision`). Creates
    /// from them would fail, so the planner holds them back. Empty for backends that cannot tell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_images: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub hourly: f64,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub id: InstanceId,
    pub name: String,
    pub state: InstanceState,
    pub created_at: Timestamp,
    /// Owner labels and anything else the provider reports (`ciscale.owner`, `ciscale.pool`, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Machine attributes comparable with a pool's `machine` (server_type, image, location, ...).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl Instance {
    pub fn owner(&self) -> Option<&str> {
        self.labels.get(OWNER_LABEL).map(String::as_str)
    }
    pub fn pool(&self) -> Option<PoolName> {
        self.labels.get(POOL_LABEL).map(|pool| PoolName::new(pool.clone()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Being created or booting.
    Pending,
    Running,
    Stopping,
    Stopped,
    /// Being deleted / terminated.
    Deleting,
    /// Gone (EC2 keeps terminated instances visible for a while).
    Terminated,
    Unknown,
}

impl InstanceState {
    /// Counts towards the pool's capacity: running or on its way there.
    pub fn is_active(self) -> bool {
        matches!(self, InstanceState::Pending | InstanceState::Running | InstanceState::Unknown)
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::Deleting => "deleting",
            InstanceState::Terminated => "terminated",
            InstanceState::Unknown => "unknown",
        };
        f.write_str(text)
    }
}

/// What one CI source reported: its agents and its queue.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiObservation {
    #[serde(default)]
    pub agents: Vec<Agent>,
    #[serde(default)]
    pub queue: Queue,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub id: AgentId,
    pub name: String,
    /// Running a job right now (Woodpecker: a running task names it; Azure: an assigned request).
    #[serde(default)]
    pub busy: bool,
    /// Drained: the CI will not give it new jobs.
    #[serde(default)]
    pub no_schedule: bool,
    #[serde(default)]
    pub last_contact: Option<Timestamp>,
    #[serde(default)]
    pub last_work: Option<Timestamp>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// When the CI created the record (Woodpecker `created`, Azure `createdOn`), where it says. A record of ours
    /// without an instance counts as a create in flight for one `bootstrapTimeout` from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    #[serde(default)]
    pub pending: Vec<Task>,
    #[serde(default)]
    pub running: Vec<Task>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub id: TaskId,
    /// Key/value attributes the CI gives the job (Woodpecker task labels such as `repo`, `platform` and internal
    /// `woodpecker-ci.org/*`; the Azure agent pool it waits in; the Forgejo job's handle). Shared: the jobs of
    /// one parsed queue hold one copy of each distinct label set ([`LabelInterner`]).
    #[serde(default)]
    pub labels: Labels,
    /// What the job demands of an agent, in its CI's words (Azure demands `name` or `name -equals value`; the
    /// `runs-on` labels of Forgejo and GitHub).
    #[serde(default)]
    pub demands: Vec<String>,
    /// The agent running it (running tasks only).
    #[serde(default)]
    pub agent_id: Option<AgentId>,
}
