//! The config file's shape, as written by the user: serde + schemars types, camelCase, no unknown keys.
//!
//! These types are the single source of the JSON schema (`ciscale schema`, `schemas/ciscale.schema.json`) and
//! of the structural checks: the checker in `check.rs` walks the YAML against the schema generated from them, so
//! the schema an editor uses and the errors ciscale prints cannot disagree. Values here are not validated yet
//! (durations are strings, references are names); `validate.rs` turns them into [`crate::model::Desired`].

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::model::{Billing, GoDuration};

/// Most agents a pool may have (`min`, `max`, `minIdle`, `createBurst`). benches/plan.rs plans 100 pools of
/// 10,000 instances each; no backend quota comes near that per pool, and a larger number is a typo that would make
/// plans of gigabytes (`max: 4294967295` with demand did).
pub const MAX_AGENTS: u32 = 10_000;
/// Most jobs one agent runs at once: a machine running more is a typo, not a machine.
pub const MAX_JOBS_PER_AGENT: u32 = 1_000;
/// Longest run of failed creates a circuit breaker waits for: beyond it, stopping is no different from never
/// stopping, which is spelled `0`.
pub const MAX_BREAKER_THRESHOLD: u32 = 1_000;
/// Most poll intervals `/healthz` stays healthy without a successful cycle: more is no health check at all.
pub const MAX_UNHEALTHY_AFTER: u32 = 1_000;
/// Most published versions of an image kept per alias: each one is a full root file system on the host.
pub const MAX_IMAGE_KEEP: u32 = 100;

/// Why a count has the upper bound it has, by its key (for the hint of a "too large" message).
pub fn bound_reason(key: &str) -> Option<&'static str> {
    Some(match key {
        "min" | "max" | "minIdle" | "createBurst" => {
            "a pool has at most 10000 agents: ciscale is built and benchmarked for that, and a larger number is \
             almost certainly a typo"
        }
        "jobsPerAgent" => "one agent runs at most 1000 jobs at once",
        "breakerThreshold" => {
            "after 1000 failed creates in a row, stopping is no different from never stopping: write `0` for that"
        }
        "unhealthyAfter" => {
            "a health check that stays green for more than 1000 poll intervals without a cycle checks nothing"
        }
        "keep" => "each kept version is a full root file system on the host",
        _ => return None,
    })
}

/// A ciscale config: keeps self-hosted CI agents at the capacity their job queue needs.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "ciscale config")]
pub struct RawConfig {
    /// Owner id: goes into the `ciscale.owner` label and into instance names. 1 to 30 of `a-z`, `0-9`, `-`.
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,30}$"))]
    pub id: String,
    /// How often `watch` observes and plans [10s].
    #[serde(default)]
    #[schemars(with = "Option<GoDuration>")]
    pub poll_interval: Option<String>,
    /// CI sources by name: where the job queue is read and agents are registered.
    pub ci: BTreeMap<String, RawCiSource>,
    /// Backend accounts by name: where instances run.
    pub backends: BTreeMap<String, RawBackend>,
    /// Pools of identical agents. Order matters: a pending job counts for the first pool that matches it.
    pub pools: Vec<RawPool>,
    /// Base images `ciscale provision` builds, by name.
    #[serde(default)]
    pub images: BTreeMap<String, RawImage>,
    /// Prometheus metrics and health endpoint of `watch` (its HTTP listener, which takes webhooks too).
    #[serde(default)]
    pub metrics: Option<RawMetrics>,
}

/// `metrics: { listen: 127.0.0.1:9922 }`: `watch` serves `/metrics` and `/healthz` there, and webhook deliveries
/// at `POST /webhooks/<ci source name>`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawMetrics {
    /// Address and port to listen on, e.g. `127.0.0.1:9922`.
    pub listen: String,
    /// `/healthz` fails once no cycle has succeeded for this many poll intervals [3].
    #[serde(default)]
    #[schemars(range(min = 1, max = MAX_UNHEALTHY_AFTER))]
    pub unhealthy_after: Option<u32>,
}

/// A secret string (token, PAT): never printed. Usually a `${VAR}` reference to the environment.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct RawSecret(pub String);

impl JsonSchema for RawSecret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }
    // Inline: the `writeOnly` marker must sit on every secret field, where the checker and editors see it.
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "writeOnly": true,
            "description": "A secret; write a `${VAR}` reference to an environment variable rather than the value."
        })
    }
}

/// A CI source; `kind` selects which.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum RawCiSource {
    /// A Woodpecker server (admin token: reads the queue, creates per-agent tokens).
    Woodpecker {
        /// Server URL, e.g. `https://ci.example.com`.
        server: String,
        /// Admin API token.
        token: RawSecret,
        /// gRPC address the agents connect to (their `WOODPECKER_SERVER`) [host of `server`, port 9000].
        #[serde(default)]
        grpc_address: Option<String>,
    },
    /// An Azure DevOps organization.
    AzurePipelines {
        /// e.g. `https://dev.azure.com/acme`.
        organization_url: String,
        /// Personal access token (agent pools: read & manage).
        pat: RawSecret,
        /// PAT handed to the agents to register themselves, scoped to "Agent Pools (read, manage)" only
        /// [the source's `pat`, with a warning: Azure has no per-agent tokens].
        #[serde(default)]
        agent_pat: Option<RawSecret>,
    },
    /// GitHub Actions: github.com or GitHub Enterprise Server. One just-in-time runner per instance (its config
    /// is its only credential); name exactly one of `repository`, `organization`, `enterprise`, and one of `app`
    /// (recommended) or `token`.
    Github {
        /// API root, for GitHub Enterprise Server (`https://HOST/api/v3`) and tests [https://api.github.com].
        #[serde(default)]
        endpoint: Option<String>,
        /// Runners of one repository, `owner/name`.
        #[serde(default)]
        repository: Option<String>,
        /// Runners of an organisation (its repositories' jobs).
        #[serde(default)]
        organization: Option<String>,
        /// Runners of an enterprise (its slug); needs `repositories`.
        #[serde(default)]
        enterprise: Option<String>,
        /// Runner group of new runners, by name or id (organisations and enterprises) [the default group].
        #[serde(default)]
        runner_group: Option<String>,
        /// A GitHub App installed on the scope (Actions: read; Administration or Self-hosted runners: write).
        #[serde(default)]
        app: Option<RawGithubApp>,
        /// A personal access token instead of an app (fine-grained: Actions read, Administration write).
        #[serde(default)]
        token: Option<RawSecret>,
        /// Repositories (`owner/name`) whose queues are read [a repository scope: that one; an app on an
        /// organisation: the installation's; a token on an organisation: the organisation's].
        #[serde(default)]
        repositories: Option<Vec<String>>,
        /// Quiet repositories polled per cycle, in turn (for hundreds of repositories; busy ones every cycle)
        /// [all, every cycle].
        #[serde(default)]
        repositories_per_cycle: Option<u32>,
        /// The secret of the organisation's or repository's `workflow_job` webhook (verified with its
        /// `X-Hub-Signature-256`), which `watch` receives at `POST /webhooks/<this source's name>` on
        /// `metrics.listen`.
        #[serde(default)]
        webhook_secret: Option<RawSecret>,
        /// The CPU of the machines its runners run on, `x64` or `arm64` [x64]: the architecture label runners
        /// get (`X64`/`ARM64`) and the runner release cloud servers download. Pools of both: two sources.
        #[serde(default)]
        arch: Option<String>,
    },
    /// A Forgejo instance (15 or later) with Forgejo Actions: one ephemeral runner per waiting job.
    Forgejo {
        /// The Forgejo URL, e.g. `https://codeberg.org`.
        server: String,
        /// An access token with the scope's rights (`read:`/`write:` of `admin`, `organization`, `repository` or
        /// `user`).
        token: RawSecret,
        /// Serve the jobs of this organisation (its owner's token). One of `organization`, `repository`,
        /// `instance`, `user`.
        #[serde(default)]
        organization: Option<String>,
        /// Serve the jobs of this repository, `owner/name` (an administrator's token).
        #[serde(default)]
        repository: Option<String>,
        /// Serve every repository of the instance (a site administrator's token).
        #[serde(default)]
        instance: Option<bool>,
        /// Serve the repositories of the token's own user.
        #[serde(default)]
        user: Option<bool>,
        /// The URL runners reach Forgejo at (`forgejo-runner one-job --url`) [`server`].
        #[serde(default)]
        runner_url: Option<String>,
        /// The forgejo-runner release a cloud server (hcloud, aws) downloads; pools on Incus use their image's.
        #[serde(default)]
        runner_release: Option<RawRunnerRelease>,
    },
    /// The in-memory fake CI (tests, demos, offline trials).
    Fake {
        /// Persist the fake world in this JSON file (relative to the config file's folder).
        #[serde(default)]
        state_file: Option<String>,
        /// Play the CI's part on every observation [false].
        #[serde(default)]
        simulate: Option<bool>,
        /// Jobs the fake CI makes up on its own as time passes, for demos (needs `simulate: true`) [none].
        #[serde(default)]
        jobs: Option<RawJobFeed>,
    },
}

/// A GitHub App installation.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawGithubApp {
    /// The app's id (a number) or its client id (`Iv1.…`).
    pub app_id: String,
    /// The installation's id (the number at the end of its settings URL).
    pub installation_id: u64,
    /// The app's private key, PEM (the `.pem` file GitHub generated).
    pub private_key: RawSecret,
}

/// A pinned forgejo-runner release: what a cloud server downloads and the digest it must have.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawRunnerRelease {
    /// `12.8.0` or later (the first with `one-job --handle`).
    pub version: String,
    /// The SHA-256 of the release binary, from the release's `.sha256` file.
    pub sha256: String,
    /// `amd64` or `arm64` [amd64].
    #[serde(default)]
    pub arch: Option<String>,
}

/// A stream of made-up jobs from one of `ciscale simulate`'s synthetic traces, one job for one of the source's
/// pools at a time; seeded, so every run of the demo sees the same jobs at the same times of day.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawJobFeed {
    /// `demo` (about a job a minute), `office-week` or `nightly-burst`.
    pub profile: String,
    /// Seed of the job generator [1].
    #[serde(default)]
    pub seed: Option<u64>,
}

/// What `ciscale simulate` assumes about a backend. Every key is optional: the backend kind's defaults apply.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSimulation {
    /// From create (or start) until the agent takes jobs: a Go duration (`45s`) or a range drawn from uniformly
    /// (`40s-90s`) [incus `1s-2s`, hcloud `40s-1m30s`, aws `45s-1m40s`, fake `1s`].
    #[serde(default)]
    pub boot_time: Option<String>,
    /// Hourly price per machine type, `cx22: 0.006 EUR`; the key `"*"` prices every other type [a bundled list
    /// for hcloud and aws; none for incus and fake].
    #[serde(default)]
    pub prices: BTreeMap<String, String>,
    /// Share of create attempts that find no capacity: `0.05` or `5%` [0].
    #[serde(default)]
    pub capacity_errors: Option<String>,
}

/// A backend account; `kind` selects which.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum RawBackend {
    /// A Hetzner Cloud project.
    Hcloud {
        /// Project API token (read & write).
        token: RawSecret,
        /// API base URL, for tests and proxies [https://api.hetzner.cloud/v1].
        #[serde(default)]
        endpoint: Option<String>,
        /// Billing granularity [hourly].
        #[serde(default)]
        billing: Option<Billing>,
        /// Creates allowed per period, e.g. `10/m` or `1/30s` [no limit]; beyond it creates wait for a later cycle.
        #[serde(default)]
        create_rate: Option<String>,
        /// Creates allowed back to back after a quiet spell [the rate's count]; needs `createRate`.
        #[serde(default)]
        #[schemars(range(min = 1, max = MAX_AGENTS))]
        create_burst: Option<u32>,
        /// How long one change (create, start, stop, delete) may run before `watch` and `apply` abandon it and
        /// decide again from what they observe [5m].
        #[serde(default)]
        change_timeout: Option<String>,
        /// What `ciscale simulate` assumes about this backend (every other command ignores it).
        #[serde(default)]
        simulation: Option<RawSimulation>,
    },
    /// An AWS EC2 account (credentials from the usual AWS environment / profile chain).
    Aws {
        /// Region [from the AWS environment].
        #[serde(default)]
        region: Option<String>,
        /// Endpoint URL, for tests (moto) and proxies.
        #[serde(default)]
        endpoint: Option<String>,
        /// Billing granularity [per-second].
        #[serde(default)]
        billing: Option<Billing>,
        /// Creates allowed per period, e.g. `10/m` or `1/30s` [no limit]; beyond it creates wait for a later cycle.
        #[serde(default)]
        create_rate: Option<String>,
        /// Creates allowed back to back after a quiet spell [the rate's count]; needs `createRate`.
        #[serde(default)]
        #[schemars(range(min = 1, max = MAX_AGENTS))]
        create_burst: Option<u32>,
        /// How long one change (create, start, stop, delete) may run before `watch` and `apply` abandon it and
        /// decide again from what they observe [5m].
        #[serde(default)]
        change_timeout: Option<String>,
        /// What `ciscale simulate` assumes about this backend (every other command ignores it).
        #[serde(default)]
        simulation: Option<RawSimulation>,
    },
    /// An Incus host (system containers).
    Incus {
        /// Unix socket path [/var/lib/incus/unix.socket].
        #[serde(default)]
        socket: Option<String>,
        /// Incus project [default].
        #[serde(default)]
        project: Option<String>,
        /// Billing granularity [per-second].
        #[serde(default)]
        billing: Option<Billing>,
        /// Creates allowed per period, e.g. `10/m` or `1/30s` [no limit]; beyond it creates wait for a later cycle.
        #[serde(default)]
        create_rate: Option<String>,
        /// Creates allowed back to back after a quiet spell [the rate's count]; needs `createRate`.
        #[serde(default)]
        #[schemars(range(min = 1, max = MAX_AGENTS))]
        create_burst: Option<u32>,
        /// How long one change (create, start, stop, delete) may run before `watch` and `apply` abandon it and
        /// decide again from what they observe [3m].
        #[serde(default)]
        change_timeout: Option<String>,
        /// What `ciscale simulate` assumes about this backend (every other command ignores it).
        #[serde(default)]
        simulation: Option<RawSimulation>,
    },
    /// The in-memory fake backend (tests, demos, offline trials).
    Fake {
        /// Persist the fake world in this JSON file (relative to the config file's folder).
        #[serde(default)]
        state_file: Option<String>,
        /// Play the CI's part on every observation [false].
        #[serde(default)]
        simulate: Option<bool>,
        /// Billing granularity [per-second].
        #[serde(default)]
        billing: Option<Billing>,
        /// Creates allowed per period, e.g. `10/m` or `1/30s` [no limit]; beyond it creates wait for a later cycle.
        #[serde(default)]
        create_rate: Option<String>,
        /// Creates allowed back to back after a quiet spell [the rate's count]; needs `createRate`.
        #[serde(default)]
        #[schemars(range(min = 1, max = MAX_AGENTS))]
        create_burst: Option<u32>,
        /// How long one change (create, start, stop, delete) may run before `watch` and `apply` abandon it and
        /// decide again from what they observe [1m].
        #[serde(default)]
        change_timeout: Option<String>,
        /// What `ciscale simulate` assumes about this backend (every other command ignores it).
        #[serde(default)]
        simulation: Option<RawSimulation>,
    },
}

/// One pool of identical agents.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPool {
    /// Pool name: goes into the `ciscale.pool` label and instance names. 1 to 30 of `a-z`, `0-9`, `-`.
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,30}$"))]
    pub name: String,
    pub ci: RawPoolCi,
    pub backend: RawPoolBackend,
    #[serde(default)]
    pub agent: Option<RawAgent>,
    #[serde(default)]
    pub scale: Option<RawScale>,
}

/// Which CI source feeds the pool, and which of its jobs the pool's agents take.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPoolCi {
    /// Name of a CI source under `ci`.
    pub source: String,
    /// Woodpecker agent labels (`key: value`, `key: "*"`, `"!key": value`); GitHub runner labels (`name: ""`,
    /// matched against a job's `runs-on`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Azure Pipelines agent pool name (azure-pipelines sources only).
    #[serde(default)]
    pub azure_pool: Option<String>,
    /// Azure capabilities the agents offer, matched against job demands (azure-pipelines sources only).
    #[serde(default)]
    pub capabilities: BTreeMap<String, String>,
}

/// Where and how the pool's instances run.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPoolBackend {
    /// Name of a backend under `backends`.
    pub name: String,
    /// Backend-specific machine attributes (`serverType`, `image`, `location`, ...). Candidate lists are
    /// comma-separated, first choice first: `serverType: cx22,cx32`.
    #[serde(default)]
    pub machine: BTreeMap<String, String>,
    /// Adopt existing instances and only start/stop them, instead of creating and deleting instances.
    #[serde(default)]
    pub start_stop: Option<RawStartStop>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawStartStop {
    /// The instances ciscale may start and stop.
    pub instances: Vec<RawAdoptedInstance>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAdoptedInstance {
    /// Provider-side instance id (e.g. `i-0abc...`).
    pub id: String,
    /// CI-side id of the agent running on it (set at most one of `agentId`, `agentName`).
    #[serde(default)]
    pub agent_id: Option<String>,
    /// CI-side name of the agent running on it, when it differs from the instance's name.
    #[serde(default)]
    pub agent_name: Option<String>,
}

/// What runs on each instance.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAgent {
    /// Agent container image or package reference.
    #[serde(default)]
    pub image: Option<String>,
    /// Plain environment for the agent (shown in plans).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Secret environment for the agent (never shown); values are usually `${VAR}` references.
    #[serde(default)]
    pub secret_env: BTreeMap<String, RawSecret>,
    /// A CI agent registered by hand that every instance of this pool runs (Picus mode; `max` must be 1).
    #[serde(default)]
    pub preregistered: Option<RawAgentRef>,
}

/// Names an existing CI agent, by its CI id or by its name.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAgentRef {
    /// The agent's id in the CI (Woodpecker: Settings → Agents).
    #[serde(default)]
    pub id: Option<String>,
    /// The agent's name in the CI.
    #[serde(default)]
    pub name: Option<String>,
}

/// Scale policy; every key is optional.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawScale {
    /// Never fewer instances [0].
    #[serde(default)]
    #[schemars(range(max = MAX_AGENTS))]
    pub min: Option<u32>,
    /// Never more instances, counting in-flight creates [1; start/stop pools: the number of instances].
    #[serde(default)]
    #[schemars(range(min = 1, max = MAX_AGENTS))]
    pub max: Option<u32>,
    /// Idle agents kept warm on top of the demand [0].
    #[serde(default)]
    #[schemars(range(max = MAX_AGENTS))]
    pub min_idle: Option<u32>,
    /// Jobs one agent runs at once [1].
    #[serde(default)]
    #[schemars(range(min = 1, max = MAX_JOBS_PER_AGENT))]
    pub jobs_per_agent: Option<u32>,
    /// An agent idle this long is drained and removed [30m].
    #[serde(default)]
    #[schemars(with = "Option<GoDuration>")]
    pub idle_timeout: Option<String>,
    /// Agents run one job and go away; gone ones are replaced [false].
    #[serde(default)]
    pub ephemeral: Option<bool>,
    /// An instance whose agent has not contacted the CI this long after creation is replaced [10m].
    #[serde(default)]
    #[schemars(with = "Option<GoDuration>")]
    pub bootstrap_timeout: Option<String>,
    /// On hourly-billed backends, keep idle instances until shortly before their paid hour ends [true].
    #[serde(default)]
    pub billing_aware: Option<bool>,
    /// How long before the end of the paid hour an idle instance goes [5m].
    #[serde(default)]
    #[schemars(with = "Option<GoDuration>")]
    pub billing_margin: Option<String>,
    /// Time windows overriding `min`, `max` and `minIdle`; the first window containing "now" wins.
    #[serde(default)]
    pub schedule: Vec<RawWindow>,
    /// `watch` stops creating in this pool after this many creates in a row failed (circuit breaker); 0 never
    /// stops [5].
    #[serde(default)]
    #[schemars(range(max = MAX_BREAKER_THRESHOLD))]
    pub breaker_threshold: Option<u32>,
    /// How long the pool stops creating before one create is tried again [5m].
    #[serde(default)]
    #[schemars(with = "Option<GoDuration>")]
    pub breaker_cooldown: Option<String>,
}

/// A recurring window, e.g. weekdays 08:00–17:59 in Berlin: `{ cron: "* 8-17 * * 1-5", timezone: Europe/Berlin }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawWindow {
    /// Shown in the plan while the window is active [`window N`].
    #[serde(default)]
    pub name: Option<String>,
    /// The minutes inside the window, as a 5-field cron pattern read in `timezone`.
    pub cron: String,
    /// IANA time zone name [UTC].
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(default)]
    #[schemars(range(max = MAX_AGENTS))]
    pub min: Option<u32>,
    #[serde(default)]
    #[schemars(range(min = 1, max = MAX_AGENTS))]
    pub max: Option<u32>,
    #[serde(default)]
    #[schemars(range(max = MAX_AGENTS))]
    pub min_idle: Option<u32>,
}

/// A base image `ciscale provision` builds.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawImage {
    /// Name of a backend under `backends`.
    pub backend: String,
    /// Image to start from, e.g. `images:debian/12`.
    pub base: String,
    /// Provisioning scripts run in order (relative to the config file's folder).
    #[serde(default)]
    pub scripts: Vec<String>,
    /// Published versions to keep [3].
    #[serde(default)]
    #[schemars(range(min = 1, max = MAX_IMAGE_KEEP))]
    pub keep: Option<u32>,
    /// URL of the CI agent tarball, given to the scripts as `AGENT_URL` (a host loopback URL is reachable from
    /// the builder through a proxy device).
    #[serde(default)]
    pub agent_url: Option<String>,
}
