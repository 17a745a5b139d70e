//! Meaning: turns the structurally checked, interpolated document into [`Desired`], checking what a schema
//! cannot say (references between sections, `min <= max`, durations, name formats, duplicates), each problem at
//! its place. Sections are converted one by one so a broken pool does not hide the problems of the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::check::{Checked, Seg};
use super::diag::{backticked, did_you_mean, Problems, Span};
use super::raw::{
    RawBackend, RawCiSource, RawGithubApp, RawImage, RawJobFeed, RawPool, RawRunnerRelease, RawScale, RawSecret,
    RawSimulation,
};
use crate::model::{
    AdoptedInstance, AgentId, AgentRef, AgentSpec, BackendBinding, BackendKind, BackendName, BackendSpec, Billing,
    CiBinding, CiKind, CiName, CiSourceSpec, CreateLimit, CreateRate, CronPattern, Desired, FakeSpec, ForgejoScope,
    GithubAuth, GithubScope, GithubSpec, GoDuration, ImageSpec, InstanceId, InstanceMode, JobFeed, MetricsSpec,
    PoolName, PoolSpec, RunnerReleaseSpec, ScalePolicy, ScheduleWindow, Secret,
};
use crate::simulate::models::Overrides;

use crate::plan::MAX_OWNER_AND_POOL_LEN;

const DEFAULT_POLL_INTERVAL: GoDuration = GoDuration::from_secs(10);
const DEFAULT_IMAGE_KEEP: u32 = 3;

/// `[a-z0-9-]{1,30}`: owner ids and pool names go into labels and instance names.
fn is_valid_name(name: &str) -> bool {
    (1..=30).contains(&name.len())
        && name.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
}

/// `^([0-9]+(\.[0-9]+)?(h|m|s|ms|us|µs|ns))+$|^0$`, the shape of Go's `time.ParseDuration` (unsigned).
fn is_go_form(text: &str) -> bool {
    if text == "0" {
        return true;
    }
    if text.is_empty() {
        return false;
    }
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        if let Some(fraction) = rest.strip_prefix('.') {
            let digits = fraction.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(fraction.len());
            if digits == 0 {
                return false;
            }
            rest = &fraction[digits..];
        }
        let Some(unit) = ["ms", "us", "µs", "ns", "h", "m", "s"].iter().find(|unit| rest.starts_with(**unit)) else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

fn ptr(segments: &[&str]) -> String {
    let path: Vec<Seg> = segments.iter().map(|segment| Seg::Key((*segment).to_owned())).collect();
    super::check::pointer(&path)
}

/// The fields of a `kind: github` source, for [`Validator::github_spec`].
struct GithubRaw {
    endpoint: Option<String>,
    repository: Option<String>,
    organization: Option<String>,
    enterprise: Option<String>,
    runner_group: Option<String>,
    app: Option<RawGithubApp>,
    token: Option<RawSecret>,
    repositories: Option<Vec<String>>,
    repositories_per_cycle: Option<u32>,
    webhook_secret: Option<RawSecret>,
    arch: Option<String>,
}

/// Why a Woodpecker filter label cannot work, if it cannot. Agents receive their labels as one
/// `WOODPECKER_AGENT_LABELS=key=value,key=value` string, split at `,` and then at the first `=`, and a `!` in front
/// of a key marks it required: so keys must be non-empty after the `!`, and hold no `=`, `,` or white space;
/// values hold no `,`.
pub(crate) fn woodpecker_label_problem(key: &str, value: &str) -> Option<&'static str> {
    let name = key.strip_prefix('!').unwrap_or(key);
    if key.is_empty() {
        return Some("the key is empty");
    }
    if name.is_empty() {
        return Some("`!` needs a key after it (`\"!key\": value` requires that value on the job)");
    }
    if name.starts_with('!') {
        return Some("a key takes at most one `!`");
    }
    if name.contains(['=', ',']) || name.chars().any(char::is_whitespace) {
        return Some("keys cannot hold `=`, `,` or white space");
    }
    if value.contains(',') {
        return Some("values cannot hold `,` (agents receive labels as one comma-separated list)");
    }
    None
}

/// A hint turning `5 minutes` / `1 hour 30 min` into Go's `5m` / `1h30m`, when the input reads that way.
pub(crate) fn duration_hint(input: &str) -> String {
    let fallback = "write a Go duration such as `30s`, `5m` or `1h30m`".to_owned();
    let mut out = String::new();
    let mut rest = input.trim();
    while !rest.is_empty() {
        let number_len = rest.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).unwrap_or(rest.len());
        if number_len == 0 {
            return fallback;
        }
        let (number, tail) = rest.split_at(number_len);
        let tail = tail.trim_start();
        let unit_len = tail.find(|ch: char| !ch.is_ascii_alphabetic()).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit = match unit.to_ascii_lowercase().as_str() {
            "h" | "hr" | "hrs" | "hour" | "hours" => "h",
            "m" | "min" | "mins" | "minute" | "minutes" => "m",
            "s" | "sec" | "secs" | "second" | "seconds" => "s",
            "ms" | "millisecond" | "milliseconds" => "ms",
            "d" | "day" | "days" => {
                let Ok(days) = number.parse::<u64>() else {
                    return fallback;
                };
                out.push_str(&format!("{}h", days * 24));
                rest = tail.trim_start_matches([' ', ',']).trim_start_matches("and ").trim_start();
                continue;
            }
            _ => return fallback,
        };
        out.push_str(number);
        out.push_str(unit);
        rest = tail.trim_start_matches([' ', ',']).trim_start_matches("and ").trim_start();
    }
    if out.is_empty() || out == input.trim() || out.parse::<GoDuration>().is_err() {
        return fallback;
    }
    format!("write `{out}`")
}

pub(crate) struct Validator<'a> {
    pub checked: &'a Checked,
    /// The interpolated document.
    pub document: &'a Value,
    /// Folder relative paths in the config resolve against.
    pub base_dir: &'a Path,
    /// The environment `${VAR}` came from; also asked for `HCLOUD_ENDPOINT`, which decides whether Hetzner's
    /// request budget applies to the poll interval.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub problems: &'a mut Problems,
    /// Out: the backends' `simulation:` settings (only `ciscale simulate` reads them).
    pub simulation: BTreeMap<BackendName, Overrides>,
}

/// A key as a JSON pointer segment (`~` and `/` escaped).
fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The variable the hcloud backend reads its endpoint from when the config sets none (named here, not imported:
/// this module knows nothing of providers).
const HCLOUD_ENDPOINT_ENV: &str = "HCLOUD_ENDPOINT";

/// The longest `pollInterval`: a daemon that looks less than once a day is a cron job.
const MAX_POLL_INTERVAL: GoDuration = GoDuration::from_secs(24 * 3600);

/// The shortest `pollInterval` a provider allows, and why. Only APIs with a budget to protect have a floor above
/// a second; a provider served on loopback (a test server, a local proxy) is not spending that budget.
struct PollFloor {
    floor: GoDuration,
    /// `backend `hetzner`` / `ci source `woodpecker``.
    provider: String,
    why: &'static str,
}

/// The fastest poll that makes sense at all: the in-memory fake (or a loopback server) has nothing to protect
/// but the CPU.
const LOOPBACK_POLL_FLOOR: GoDuration = GoDuration(std::time::Duration::from_millis(100));

/// Whether a URL (or `host:port`) names this machine: `localhost`, `127.0.0.0/8` or `::1`.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(host, _)| host),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|address| address.is_loopback())
}

fn backend_poll_floor(name: &BackendName, kind: &BackendKind, env: &dyn Fn(&str) -> Option<String>) -> PollFloor {
    let provider = format!("backend `{name}` ({})", kind.name());
    let local = |floor: GoDuration, why| PollFloor { floor, provider: provider.clone(), why };
    match kind {
        BackendKind::Hcloud { endpoint, .. }
            if !endpoint.clone().or_else(|| env(HCLOUD_ENDPOINT_ENV)).is_some_and(|url| is_loopback_url(&url)) =>
        {
            local(
                GoDuration::from_secs(5),
                "Hetzner allows 3600 API requests an hour per project and every cycle lists its servers: a 5s poll \
                 spends 720 of them, leaving the rest for creates, deletes and other tools",
            )
        }
        BackendKind::Aws { endpoint, .. } if !endpoint.as_deref().is_some_and(is_loopback_url) => local(
            GoDuration::from_secs(1),
            "EC2 throttles `DescribeInstances` per account and region (a bucket refilled at 20 requests a second, \
             shared with every other tool), and every cycle makes one or two",
        ),
        BackendKind::Incus { .. } => local(
            GoDuration::from_secs(1),
            "Incus wakes `watch` at once when a container stops: the poll is only the safety net",
        ),
        _ => local(LOOPBACK_POLL_FLOOR, "nothing but this machine's CPU is spent on each cycle"),
    }
}

fn ci_poll_floor(name: &CiName, kind: &CiKind) -> PollFloor {
    let provider = format!("ci source `{name}` ({})", kind.name());
    let local = |floor: GoDuration, why| PollFloor { floor, provider: provider.clone(), why };
    match kind {
        CiKind::Woodpecker { server, .. } if !is_loopback_url(server) => {
            local(GoDuration::from_secs(1), "every cycle asks your Woodpecker server for its queue and its agents")
        }
        CiKind::AzurePipelines { organization_url, .. } if !is_loopback_url(organization_url) => local(
            GoDuration::from_secs(5),
            "Azure DevOps throttles each identity by the load of its requests over 5-minute windows, and every \
             cycle costs two calls per bound agent pool",
        ),
        CiKind::Github(spec) if !spec.endpoint.as_deref().is_some_and(is_loopback_url) => local(
            GoDuration::from_secs(5),
            "every cycle reads each repository's queued and running workflow runs (two calls per repository; \
             unchanged answers are free of the hourly budget, but GitHub allows 900 a minute)",
        ),
        CiKind::Forgejo { server, .. } if !is_loopback_url(server) => local(
            GoDuration::from_secs(1),
            "every cycle asks your Forgejo for its waiting jobs and its runners (two calls)",
        ),
        _ => local(LOOPBACK_POLL_FLOOR, "nothing but this machine's CPU is spent on each cycle"),
    }
}

impl Validator<'_> {
    fn value_span(&self, pointer: &str) -> Option<Span> {
        self.checked.value_span(pointer)
    }

    /// `azurePool` and `capabilities` belong to Azure Pipelines pools: on a pool of a `kind` source each is a
    /// problem at its key, with the `hint` that says how that kind's pools select jobs. `false` when any is there.
    fn no_azure_keys(&mut self, raw: &RawPool, pointer: &str, place: &str, kind: &str, hint: &str) -> bool {
        let mut ok = true;
        for (key, present) in
            [("azurePool", raw.ci.azure_pool.is_some()), ("capabilities", !raw.ci.capabilities.is_empty())]
        {
            if present {
                self.problems.push(
                    self.key_span(&format!("{pointer}/ci/{key}")),
                    format!(
                        "`{key}` in {place} applies only to azure-pipelines sources; `{}` is a {kind} source",
                        raw.ci.source
                    ),
                    Some(hint.to_owned()),
                );
                ok = false;
            }
        }
        ok
    }

    fn key_span(&self, pointer: &str) -> Option<Span> {
        self.checked.key_span(pointer)
    }

    /// Converts one section. Values with structural problems were left out of the document, so a section with
    /// a bad optional key still converts (and gets its semantic checks); one missing a required value does not,
    /// and its problem is already reported.
    fn section<T: DeserializeOwned>(&mut self, pointer: &str, what: &str) -> Option<T> {
        let value = self.document.pointer(pointer)?.clone();
        match serde_json::from_value(value) {
            Ok(section) => Some(section),
            Err(_) if self.checked.is_broken(pointer) => None,
            Err(_) => {
                // The structural check accepted what serde refuses: a bug in ciscale, not in the config. The
                // serde message is left out: it may quote a value, and values may be secrets.
                self.problems.push(
                    self.key_span(pointer),
                    format!("{what} could not be read"),
                    Some("this is a bug in ciscale's config checks; please report it".to_owned()),
                );
                None
            }
        }
    }

    /// A value with a structural problem was left out: relations involving it are not checked (its problem is
    /// reported already, and its default would give a misleading second one).
    fn is_broken(&self, pointer: &str) -> bool {
        self.checked.is_broken(pointer)
    }

    /// Schedule windows: each pattern parses, each time zone exists, and the bounds a window sets are consistent
    /// with the pool's own where it leaves them unset.
    fn schedule(
        &mut self,
        pointer: &str,
        place_suffix: &str,
        raw: &[crate::config::raw::RawWindow],
        (min, max, min_idle): (u32, u32, u32),
    ) -> Option<Vec<ScheduleWindow>> {
        let mut windows = Vec::new();
        let mut ok = true;
        for (index, window) in raw.iter().enumerate() {
            let at = |field: &str| format!("{pointer}/{index}/{field}");
            let name = window.name.clone().unwrap_or_else(|| format!("window {}", index + 1));
            let cron = match CronPattern::parse(&window.cron) {
                Ok(cron) => Some(cron),
                Err(why) => {
                    self.problems.push(
                        self.value_span(&at("cron")),
                        format!("invalid cron pattern `{}` in schedule `{name}`{place_suffix}: {why}", window.cron),
                        Some(
                            "five fields: minute hour day-of-month month day-of-week, e.g. `* 8-17 * * 1-5`".to_owned(),
                        ),
                    );
                    None
                }
            };
            let zone_name = window.timezone.as_deref().unwrap_or("UTC");
            let timezone = match jiff::tz::TimeZone::get(zone_name) {
                Ok(zone) => Some(zone),
                Err(_) => {
                    self.problems.push(
                        self.value_span(&at("timezone")),
                        format!("unknown time zone `{zone_name}` in schedule `{name}`{place_suffix}"),
                        Some("use an IANA name such as `Europe/Berlin` or `UTC`".to_owned()),
                    );
                    None
                }
            };
            let (w_min, w_max, w_idle) =
                (window.min.unwrap_or(min), window.max.unwrap_or(max), window.min_idle.unwrap_or(min_idle));
            if w_min > w_max || w_idle > w_max {
                self.problems.push(
                    self.value_span(&at("max"))
                        .or_else(|| self.value_span(&at("min")))
                        .or_else(|| self.value_span(&at("minIdle"))),
                    format!("schedule `{name}`{place_suffix} gives min {w_min}, minIdle {w_idle} above max {w_max}"),
                    Some("a window's `min` and `minIdle` must not exceed its `max` (or the pool's)".to_owned()),
                );
                ok = false;
            }
            match (cron, timezone) {
                (Some(cron), Some(timezone)) => windows.push(ScheduleWindow {
                    name,
                    cron,
                    timezone,
                    min: window.min,
                    max: window.max,
                    min_idle: window.min_idle,
                }),
                _ => ok = false,
            }
        }
        ok.then_some(windows)
    }

    fn duration(
        &mut self,
        pointer: &str,
        field: &str,
        place: &str,
        raw: Option<&str>,
        default: GoDuration,
    ) -> Option<GoDuration> {
        let Some(raw) = raw else { return Some(default) };
        // Go's form only: `GoDuration::from_str` also takes jiff's friendly `5 minutes`, which Go (and so a
        // Picus or Woodpecker user's other tools) would refuse.
        let parsed = if is_go_form(raw) { raw.parse::<GoDuration>().ok() } else { None };
        match parsed {
            Some(duration) => Some(duration),
            None => {
                self.problems.push(
                    self.value_span(pointer),
                    format!("invalid duration `{raw}` for `{field}`{place}"),
                    Some(duration_hint(raw)),
                );
                None
            }
        }
    }

    /// `createRate` / `createBurst` of a backend: both absent is no limit; a burst alone is refused (a burst of
    /// what rate?).
    fn create_limit(
        &mut self,
        pointer: &str,
        name: &str,
        rate: Option<&str>,
        burst: Option<u32>,
    ) -> Option<CreateLimit> {
        let Some(rate) = rate else {
            if burst.is_some() {
                self.problems.push(
                    self.key_span(&format!("{pointer}/createBurst")),
                    format!("`createBurst` of backend `{name}` needs a `createRate`"),
                    Some("add e.g. `createRate: 10/m`, or remove `createBurst`".to_owned()),
                );
            }
            return None;
        };
        match rate.parse::<CreateRate>() {
            Ok(rate) => Some(CreateLimit { rate, burst: burst.unwrap_or(rate.count).max(1) }),
            Err(why) => {
                self.problems.push(
                    self.value_span(&format!("{pointer}/createRate")),
                    format!("invalid `createRate` `{rate}` of backend `{name}`: {why}"),
                    Some("write creates per period: `10/m`, `2/s`, `100/h` or `1/30s`".to_owned()),
                );
                None
            }
        }
    }

    /// `changeTimeout` of a backend: absent is the default for its kind (`apply::default_change_timeout`); zero
    /// is refused, since it would abandon every change before its first call.
    fn change_timeout(&mut self, pointer: &str, name: &str, raw: Option<&str>) -> Option<GoDuration> {
        let raw = raw?;
        let place = format!(" of backend `{name}`");
        let field = format!("{pointer}/changeTimeout");
        let timeout = self.duration(&field, "changeTimeout", &place, Some(raw), GoDuration::default())?;
        if timeout.0.is_zero() {
            self.problems.push(
                self.value_span(&field),
                format!("`changeTimeout`{place} must be longer than zero"),
                Some("leave it out for the backend's default, or give e.g. `10m`".to_owned()),
            );
            return None;
        }
        Some(timeout)
    }

    fn resolve_path(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }

    /// Exactly one of `organization`, `repository` (`owner/name`), `instance: true`, `user: true`.
    fn forgejo_scope(
        &mut self,
        pointer: &str,
        organization: Option<String>,
        repository: Option<String>,
        instance: Option<bool>,
        user: Option<bool>,
    ) -> Option<ForgejoScope> {
        let mut named: Vec<(&str, ForgejoScope)> = Vec::new();
        if let Some(org) = organization {
            if org.trim().is_empty() || org.contains('/') {
                self.problems.push(
                    self.value_span(&format!("{pointer}/organization")),
                    format!("`organization` `{org}` is not an organisation name"),
                    Some("write the organisation's name, e.g. `organization: acme`".to_owned()),
                );
                return None;
            }
            named.push(("organization", ForgejoScope::Organization(org)));
        }
        if let Some(repository) = repository {
            match repository.split_once('/') {
                Some((owner, repo)) if !owner.trim().is_empty() && !repo.trim().is_empty() && !repo.contains('/') => {
                    named.push((
                        "repository",
                        ForgejoScope::Repository { owner: owner.to_owned(), repo: repo.to_owned() },
                    ));
                }
                _ => {
                    self.problems.push(
                        self.value_span(&format!("{pointer}/repository")),
                        format!("`repository` `{repository}` is not `owner/name`"),
                        Some("write e.g. `repository: acme/app`".to_owned()),
                    );
                    return None;
                }
            }
        }
        if instance == Some(true) {
            named.push(("instance", ForgejoScope::Instance));
        }
        if user == Some(true) {
            named.push(("user", ForgejoScope::User));
        }
        match named.len() {
            1 => named.pop().map(|(_, scope)| scope),
            0 => {
                self.problems.push(
                    self.key_span(pointer).or_else(|| self.value_span(pointer)),
                    "a forgejo source names no scope".to_owned(),
                    Some(
                        "add one of `organization: NAME`, `repository: OWNER/NAME`, `instance: true` (a site \
                         administrator's token) or `user: true`"
                            .to_owned(),
                    ),
                );
                None
            }
            _ => {
                let keys: Vec<String> = named.iter().map(|(key, _)| format!("`{key}`")).collect();
                self.problems.push(
                    self.key_span(&format!("{pointer}/{}", named[1].0)),
                    format!("a forgejo source serves one scope, this one names {}", keys.join(" and ")),
                    Some("keep one; a second scope is a second source".to_owned()),
                );
                None
            }
        }
    }

    /// A pinned runner release, checked as the cloud-init will need it.
    fn runner_release(&mut self, pointer: &str, raw: RawRunnerRelease) -> Option<RunnerReleaseSpec> {
        use crate::providers::forgejo::launch::{Arch, RunnerRelease};
        let arch_text = raw.arch.clone().unwrap_or_else(|| "amd64".to_owned());
        let arch = match arch_text.as_str() {
            "amd64" => Arch::Amd64,
            "arm64" => Arch::Arm64,
            other => {
                self.problems.push(
                    self.value_span(&format!("{pointer}/runnerRelease/arch")),
                    format!("runner arch `{other}` is not one forgejo-runner is released for"),
                    Some("write `amd64` or `arm64`".to_owned()),
                );
                return None;
            }
        };
        match RunnerRelease::new(&raw.version, arch, &raw.sha256) {
            Ok(_) => Some(RunnerReleaseSpec {
                version: raw.version.trim().trim_start_matches('v').to_owned(),
                sha256: raw.sha256.trim().to_ascii_lowercase(),
                arch: arch_text,
            }),
            Err(error) => {
                let key = match error {
                    crate::providers::forgejo::launch::LaunchError::Checksum(_) => "sha256",
                    _ => "version",
                };
                let text = error.to_string();
                let (message, hint) = match text.split_once("\nhint: ") {
                    Some((message, hint)) => (message.to_owned(), Some(hint.to_owned())),
                    None => (text, None),
                };
                self.problems.push(self.value_span(&format!("{pointer}/runnerRelease/{key}")), message, hint);
                None
            }
        }
    }

    /// A GitHub source's scope and auth: exactly one of each, with the checks that need no call to GitHub.
    fn github_spec(&mut self, pointer: &str, name: &str, raw: GithubRaw) -> Option<GithubSpec> {
        let place = format!("ci source `{name}`");
        let mut ok = true;
        let scopes: Vec<(&str, GithubScope)> = [
            raw.repository.map(|repository| ("repository", GithubScope::Repository(repository))),
            raw.organization.map(|org| ("organization", GithubScope::Organization(org))),
            raw.enterprise.map(|enterprise| ("enterprise", GithubScope::Enterprise(enterprise))),
        ]
        .into_iter()
        .flatten()
        .collect();
        let scope = match scopes.as_slice() {
            [(_, scope)] => Some(scope.clone()),
            [] => {
                self.problems.push(
                    self.value_span(pointer),
                    format!("{place} names no scope"),
                    Some("add `organization: NAME`, `repository: OWNER/NAME` or `enterprise: SLUG`".to_owned()),
                );
                None
            }
            [_, (second, _), ..] => {
                self.problems.push(
                    self.key_span(&format!("{pointer}/{second}")),
                    format!("{place} names more than one scope"),
                    Some("keep one of `repository`, `organization`, `enterprise`: runners belong to one".to_owned()),
                );
                None
            }
        };
        if let Some(GithubScope::Repository(repository)) = &scope {
            let parts: Vec<&str> = repository.split('/').collect();
            if parts.len() != 2 || parts.iter().any(|part| part.trim().is_empty()) {
                self.problems.push(
                    self.value_span(&format!("{pointer}/repository")),
                    format!("`repository` of {place} is not `owner/name`: `{repository}`"),
                    Some("write it as on GitHub, e.g. `acme/app`".to_owned()),
                );
                ok = false;
            }
            if raw.runner_group.is_some() {
                self.problems.push(
                    self.key_span(&format!("{pointer}/runnerGroup")),
                    format!("`runnerGroup` of {place} has no meaning for a repository's runners"),
                    Some("runner groups belong to organisations and enterprises: remove `runnerGroup`".to_owned()),
                );
                ok = false;
            }
        }
        if matches!(scope, Some(GithubScope::Enterprise(_))) && raw.repositories.is_none() {
            self.problems.push(
                self.key_span(&format!("{pointer}/enterprise")),
                format!("{place} serves an enterprise but lists no `repositories`"),
                Some("GitHub has no list of an enterprise's repositories: name them in `repositories`".to_owned()),
            );
            ok = false;
        }
        for (index, repository) in raw.repositories.iter().flatten().enumerate() {
            let parts: Vec<&str> = repository.split('/').collect();
            if parts.len() != 2 || parts.iter().any(|part| part.trim().is_empty()) {
                self.problems.push(
                    self.value_span(&format!("{pointer}/repositories/{index}")),
                    format!("repository `{repository}` of {place} is not `owner/name`"),
                    Some("write it as on GitHub, e.g. `acme/app`".to_owned()),
                );
                ok = false;
            }
        }
        if raw.repositories_per_cycle == Some(0) {
            self.problems.push(
                self.value_span(&format!("{pointer}/repositoriesPerCycle")),
                format!("`repositoriesPerCycle` of {place} is 0"),
                Some("poll at least one quiet repository per cycle, or remove the key to poll all of them".to_owned()),
            );
            ok = false;
        }
        let arm64 = match raw.arch.as_deref() {
            None | Some("x64") => false,
            Some("arm64") => true,
            Some(other) => {
                let hint = match other.to_ascii_lowercase().as_str() {
                    "amd64" | "x86_64" | "x86-64" | "x64" => "write `x64`, GitHub's name for it".to_owned(),
                    "aarch64" | "arm64" => "write `arm64`, GitHub's name for it".to_owned(),
                    _ => "ciscale launches GitHub runners on `x64` and `arm64` machines".to_owned(),
                };
                self.problems.push(
                    self.value_span(&format!("{pointer}/arch")),
                    format!("`arch: {other}` of {place} is not `x64` or `arm64`"),
                    Some(hint),
                );
                ok = false;
                false
            }
        };
        let auth = match (raw.app, raw.token) {
            (Some(app), None) => Some(GithubAuth::App {
                app_id: app.app_id,
                installation_id: app.installation_id,
                private_key: Secret::new(app.private_key.0),
            }),
            (None, Some(token)) => Some(GithubAuth::Token(Secret::new(token.0))),
            (None, None) => {
                self.problems.push(
                    self.value_span(pointer),
                    format!("{place} has no credentials"),
                    Some(
                        "add `app: {appId: …, installationId: …, privateKey: \"${GITHUB_APP_KEY}\"}` (recommended) or \
                         `token: \"${GITHUB_TOKEN}\"`"
                            .to_owned(),
                    ),
                );
                None
            }
            (Some(_), Some(_)) => {
                self.problems.push(
                    self.key_span(&format!("{pointer}/token")),
                    format!("{place} has both `app` and `token`"),
                    Some(
                        "keep one: an app (its own rate limit, tokens that expire by themselves) or a token".to_owned(),
                    ),
                );
                None
            }
        };
        let (Some(scope), Some(auth), true) = (scope, auth, ok) else {
            return None;
        };
        Some(GithubSpec {
            endpoint: raw.endpoint,
            scope,
            auth,
            runner_group: raw.runner_group,
            repositories: raw.repositories,
            repositories_per_cycle: raw.repositories_per_cycle,
            webhook_secret: raw.webhook_secret.map(|secret| Secret::new(secret.0)),
            arm64,
        })
    }

    fn fake_spec(&self, state_file: Option<String>, simulate: Option<bool>) -> FakeSpec {
        FakeSpec {
            state_file: state_file.map(|file| self.resolve_path(&file)),
            simulate: simulate.unwrap_or(false),
            jobs: None,
        }
    }

    /// A fake CI's `jobs:` feed: a known synthetic profile.
    fn job_feed(&mut self, pointer: &str, raw: RawJobFeed) -> Option<JobFeed> {
        match raw.profile.parse::<crate::simulate::synthetic::Profile>() {
            Ok(profile) => Some(JobFeed { profile: profile.name().to_owned(), seed: raw.seed.unwrap_or(1) }),
            Err(why) => {
                self.problems.push(self.value_span(&format!("{pointer}/jobs/profile")), why, None);
                None
            }
        }
    }

    /// A backend's `simulation:` settings, each checked at its place.
    fn simulation(&mut self, pointer: &str, raw: RawSimulation) -> Overrides {
        use crate::simulate::models::{parse_price, parse_rate, BootTime};
        let mut overrides = Overrides::default();
        if let Some(text) = &raw.capacity_errors {
            match parse_rate(text) {
                Ok(rate) => overrides.capacity_errors = Some(rate),
                Err(why) => {
                    self.problems.push(self.value_span(&format!("{pointer}/simulation/capacityErrors")), why, None)
                }
            }
        }
        if let Some(text) = &raw.boot_time {
            match text.parse::<BootTime>() {
                Ok(boot_time) => overrides.boot_time = Some(boot_time),
                Err(why) => self.problems.push(
                    self.value_span(&format!("{pointer}/simulation/bootTime")),
                    format!("invalid `bootTime` `{text}`: {why}"),
                    Some("write a Go duration such as `45s`, or a range such as `40s-90s`".to_owned()),
                ),
            }
        }
        for (machine, text) in &raw.prices {
            match parse_price(text) {
                Ok(price) => {
                    overrides.prices.insert(machine.clone(), price);
                }
                Err(why) => self.problems.push(
                    self.value_span(&format!("{pointer}/simulation/prices/{}", escape_pointer(machine))),
                    why,
                    None,
                ),
            }
        }
        overrides
    }

    fn object_keys(&self, pointer: &str) -> Vec<String> {
        self.checked.child_keys(pointer)
    }

    pub(crate) fn validate(&mut self, config_hash: String) -> Option<Desired> {
        let mut complete = true;

        let owner = self.document.get("id").and_then(Value::as_str).map(str::to_owned);
        if let Some(owner) = &owner {
            if !is_valid_name(owner) {
                self.problems.push(
                    self.value_span("/id"),
                    format!("invalid owner id `{owner}`"),
                    Some("use 1 to 30 of `a-z`, `0-9` and `-`: it goes into labels and instance names".to_owned()),
                );
            }
        }
        let poll_raw = self.document.get("pollInterval").and_then(Value::as_str).map(str::to_owned);
        let poll_interval =
            self.duration("/pollInterval", "pollInterval", "", poll_raw.as_deref(), DEFAULT_POLL_INTERVAL);

        // -- ci sources ---------------------------------------------------------------------------------------
        let ci_names = self.object_keys("/ci");
        let mut ci = BTreeMap::new();
        for name in &ci_names {
            let pointer = ptr(&["ci", name]);
            let Some(raw) = self.section::<RawCiSource>(&pointer, &format!("ci source `{name}`")) else {
                complete = false;
                continue;
            };
            let kind = match raw {
                RawCiSource::Woodpecker { server, token, grpc_address } => {
                    CiKind::Woodpecker { server, token: Secret::new(token.0), grpc_address }
                }
                RawCiSource::AzurePipelines { organization_url, pat, agent_pat } => CiKind::AzurePipelines {
                    organization_url,
                    pat: Secret::new(pat.0),
                    agent_pat: agent_pat.map(|agent_pat| Secret::new(agent_pat.0)),
                },
                RawCiSource::Github {
                    endpoint,
                    repository,
                    organization,
                    enterprise,
                    runner_group,
                    app,
                    token,
                    repositories,
                    repositories_per_cycle,
                    webhook_secret,
                    arch,
                } => {
                    let Some(spec) = self.github_spec(
                        &pointer,
                        name,
                        GithubRaw {
                            endpoint,
                            repository,
                            organization,
                            enterprise,
                            runner_group,
                            app,
                            token,
                            repositories,
                            repositories_per_cycle,
                            webhook_secret,
                            arch,
                        },
                    ) else {
                        complete = false;
                        continue;
                    };
                    CiKind::Github(spec)
                }
                RawCiSource::Fake { state_file, simulate, jobs } => {
                    let mut spec = self.fake_spec(state_file, simulate);
                    spec.jobs = jobs.and_then(|jobs| self.job_feed(&pointer, jobs));
                    CiKind::Fake(spec)
                }
                RawCiSource::Forgejo {
                    server,
                    token,
                    organization,
                    repository,
                    instance,
                    user,
                    runner_url,
                    runner_release,
                } => {
                    let scope = self.forgejo_scope(&pointer, organization, repository, instance, user);
                    let runner_release = match runner_release {
                        Some(release) => match self.runner_release(&pointer, release) {
                            Some(release) => Some(release),
                            None => {
                                complete = false;
                                continue;
                            }
                        },
                        None => None,
                    };
                    let Some(scope) = scope else {
                        complete = false;
                        continue;
                    };
                    CiKind::Forgejo { server, token: Secret::new(token.0), scope, runner_url, runner_release }
                }
            };
            ci.insert(CiName::new(name.clone()), CiSourceSpec { kind });
        }

        // -- backends -----------------------------------------------------------------------------------------
        let backend_names = self.object_keys("/backends");
        let mut backends = BTreeMap::new();
        for name in &backend_names {
            let pointer = ptr(&["backends", name]);
            let Some(raw) = self.section::<RawBackend>(&pointer, &format!("backend `{name}`")) else {
                complete = false;
                continue;
            };
            let (kind, billing, create_rate, create_burst, change_timeout, simulation) = match raw {
                RawBackend::Hcloud {
                    token,
                    endpoint,
                    billing,
                    create_rate,
                    create_burst,
                    change_timeout,
                    simulation,
                } => (
                    BackendKind::Hcloud { token: Secret::new(token.0), endpoint },
                    billing.unwrap_or(Billing::Hourly),
                    create_rate,
                    create_burst,
                    change_timeout,
                    simulation,
                ),
                RawBackend::Aws {
                    region,
                    endpoint,
                    billing,
                    create_rate,
                    create_burst,
                    change_timeout,
                    simulation,
                } => (
                    BackendKind::Aws { region, endpoint },
                    billing.unwrap_or(Billing::PerSecond),
                    create_rate,
                    create_burst,
                    change_timeout,
                    simulation,
                ),
                RawBackend::Incus {
                    socket,
                    project,
                    billing,
                    create_rate,
                    create_burst,
                    change_timeout,
                    simulation,
                } => (
                    BackendKind::Incus { socket, project },
                    billing.unwrap_or(Billing::PerSecond),
                    create_rate,
                    create_burst,
                    change_timeout,
                    simulation,
                ),
                RawBackend::Fake {
                    state_file,
                    simulate,
                    billing,
                    create_rate,
                    create_burst,
                    change_timeout,
                    simulation,
                } => (
                    BackendKind::Fake(self.fake_spec(state_file, simulate)),
                    billing.unwrap_or(Billing::PerSecond),
                    create_rate,
                    create_burst,
                    change_timeout,
                    simulation,
                ),
            };
            let create_limit = self.create_limit(&pointer, name, create_rate.as_deref(), create_burst);
            let change_timeout = self.change_timeout(&pointer, name, change_timeout.as_deref());
            if let Some(simulation) = simulation {
                let overrides = self.simulation(&pointer, simulation);
                self.simulation.insert(BackendName::new(name.clone()), overrides);
            }
            backends
                .insert(BackendName::new(name.clone()), BackendSpec { kind, billing, create_limit, change_timeout });
        }

        if let Some(interval) = poll_interval {
            self.check_poll_interval(interval, &ci, &backends);
        }

        // -- pools --------------------------------------------------------------------------------------------
        let pool_count = self.document.get("pools").and_then(Value::as_array).map_or(0, Vec::len);
        let mut pools = Vec::new();
        let mut first_pool_at: BTreeMap<String, Option<Span>> = BTreeMap::new();
        let mut adopted_by: BTreeMap<String, (String, Option<Span>)> = BTreeMap::new();
        for index in 0..pool_count {
            let pointer = format!("/pools/{index}");
            let Some(raw) = self.section::<RawPool>(&pointer, &format!("pool #{}", index + 1)) else {
                complete = false;
                continue;
            };
            let name_span = self.value_span(&format!("{pointer}/name"));
            match first_pool_at.get(&raw.name) {
                Some(first) => {
                    let first_line = first.map(|span| format!(" (line {})", span.line)).unwrap_or_default();
                    self.problems.push_related(
                        name_span,
                        format!("duplicate pool name `{}`", raw.name),
                        Some(format!(
                            "pool names must be unique; the first `{}` is defined earlier{first_line}",
                            raw.name
                        )),
                        first.map(|span| (span, "first defined here")),
                    );
                }
                None => {
                    first_pool_at.insert(raw.name.clone(), name_span);
                }
            }
            if let Some(pool) = self.pool(&pointer, raw, &ci, &ci_names, &backends, &backend_names, &mut adopted_by) {
                pools.push(pool);
            } else {
                complete = false;
            }
        }

        // -- images -------------------------------------------------------------------------------------------
        let mut images = BTreeMap::new();
        for name in self.object_keys("/images") {
            let pointer = ptr(&["images", &name]);
            let Some(raw) = self.section::<RawImage>(&pointer, &format!("image `{name}`")) else {
                complete = false;
                continue;
            };
            if !backend_names.contains(&raw.backend) {
                self.unknown_reference(
                    &format!("{pointer}/backend"),
                    "backend",
                    &raw.backend,
                    &format!("image `{name}`"),
                    &backend_names,
                    "backends",
                );
            }
            images.insert(
                name,
                ImageSpec {
                    backend: BackendName::new(raw.backend),
                    base: raw.base,
                    scripts: raw.scripts.iter().map(|script| self.resolve_path(script)).collect(),
                    keep: raw.keep.unwrap_or(DEFAULT_IMAGE_KEEP),
                    agent_url: raw.agent_url,
                },
            );
        }

        let raw_metrics = self.section::<crate::config::raw::RawMetrics>("/metrics", "`metrics`");
        let metrics = match &raw_metrics {
            None => None,
            Some(metrics) => match metrics.listen.parse::<std::net::SocketAddr>() {
                Ok(listen) => {
                    Some(MetricsSpec { listen, unhealthy_after: metrics.unhealthy_after.unwrap_or(3).max(1) })
                }
                Err(_) => {
                    self.problems.push(
                        self.value_span("/metrics/listen"),
                        format!("`metrics.listen` `{}` is not an address and port", metrics.listen),
                        Some("write e.g. `127.0.0.1:9922` (or `0.0.0.0:9922` to listen on every interface)".to_owned()),
                    );
                    None
                }
            },
        };
        if !complete || !self.problems.is_empty() {
            return None;
        }
        Some(Desired {
            metrics,
            owner: owner?,
            poll_interval: poll_interval?,
            ci,
            backends,
            pools,
            images,
            config_hash,
        })
    }

    /// `pollInterval` within what every provider the config uses allows: the strictest floor is reported.
    fn check_poll_interval(
        &mut self,
        interval: GoDuration,
        ci: &BTreeMap<CiName, CiSourceSpec>,
        backends: &BTreeMap<BackendName, BackendSpec>,
    ) {
        let span = self.value_span("/pollInterval");
        if interval > MAX_POLL_INTERVAL {
            self.problems.push(
                span,
                format!("`pollInterval` {interval} is too long: at most {MAX_POLL_INTERVAL}"),
                Some("a daemon that looks less than once a day is a cron job: run `ciscale apply --auto-approve` from cron instead".to_owned()),
            );
            return;
        }
        let floors = backends
            .iter()
            .map(|(name, spec)| backend_poll_floor(name, &spec.kind, self.env))
            .chain(ci.iter().map(|(name, spec)| ci_poll_floor(name, &spec.kind)));
        let strictest = floors
            .filter(|floor| interval < floor.floor)
            .max_by(|a, b| a.floor.cmp(&b.floor).then_with(|| b.provider.cmp(&a.provider)));
        let floor = match strictest {
            Some(floor) => floor,
            // Nothing named a floor above the interval; zero is never a poll interval.
            None if interval.0.is_zero() => PollFloor {
                floor: LOOPBACK_POLL_FLOOR,
                provider: "any provider".to_owned(),
                why: "a zero interval would poll without pause",
            },
            None => return,
        };
        let where_ = if span.is_some() {
            format!("`pollInterval` {interval}")
        } else {
            format!("the default `pollInterval` {interval}")
        };
        self.problems.push(
            span,
            format!("{where_} is too short for {}: at least {}", floor.provider, floor.floor),
            Some(format!("{}; write `pollInterval: {}` or longer", floor.why, floor.floor)),
        );
    }

    fn unknown_reference(
        &mut self,
        pointer: &str,
        what: &str,
        name: &str,
        place: &str,
        known: &[String],
        section: &str,
    ) {
        let hint = if known.is_empty() {
            format!("no {what}s are defined under `{section}`")
        } else {
            let list = backticked(known.iter().map(String::as_str));
            match did_you_mean(name, known.iter().map(String::as_str)) {
                Some(guess) => format!("{guess} known {what}s: {list}"),
                None => format!("known {what}s: {list}"),
            }
        };
        self.problems.push(self.value_span(pointer), format!("unknown {what} `{name}` in {place}"), Some(hint));
    }

    #[allow(clippy::too_many_arguments)]
    fn pool(
        &mut self,
        pointer: &str,
        raw: RawPool,
        ci: &BTreeMap<CiName, CiSourceSpec>,
        ci_names: &[String],
        backends: &BTreeMap<BackendName, BackendSpec>,
        backend_names: &[String],
        adopted_by: &mut BTreeMap<String, (String, Option<Span>)>,
    ) -> Option<PoolSpec> {
        let place = format!("pool `{}`", raw.name);
        let mut ok = true;
        if !is_valid_name(&raw.name) {
            self.problems.push(
                self.value_span(&format!("{pointer}/name")),
                format!("invalid pool name `{}`", raw.name),
                Some("use 1 to 30 of `a-z`, `0-9` and `-`: it goes into labels and instance names".to_owned()),
            );
            ok = false;
        }
        // Instance (and agent) names are `{owner}-{pool}-{digest}-{n}` and must stay a valid hostname.
        let owner = self.document.get("id").and_then(Value::as_str).unwrap_or_default();
        let together = owner.len() + raw.name.len();
        if is_valid_name(&raw.name) && together > MAX_OWNER_AND_POOL_LEN {
            self.problems.push(
                self.value_span(&format!("{pointer}/name")),
                format!(
                    "pool name `{}` is too long for owner id `{owner}`: together they have {together} characters, \
                     at most {MAX_OWNER_AND_POOL_LEN} fit",
                    raw.name
                ),
                Some(
                    "instance names are `<id>-<pool>-<digest>-<n>` and must stay within the 63 characters of a \
                     hostname: shorten the pool name or the id"
                        .to_owned(),
                ),
            );
            ok = false;
        }

        // CI binding: the source must exist, and source-specific keys must fit its kind.
        if !ci_names.contains(&raw.ci.source) {
            self.unknown_reference(
                &format!("{pointer}/ci/source"),
                "ci source",
                &raw.ci.source,
                &place,
                ci_names,
                "ci",
            );
            ok = false;
        }
        match ci.get(&CiName::new(raw.ci.source.clone())).map(|source| &source.kind) {
            Some(CiKind::Woodpecker { .. }) => {
                ok &= self.no_azure_keys(
                    &raw,
                    &pointer,
                    &place,
                    "woodpecker",
                    "woodpecker pools select jobs with `labels`",
                );
            }
            Some(CiKind::AzurePipelines { .. }) => {
                if !raw.ci.labels.is_empty() {
                    self.problems.push(
                        self.key_span(&format!("{pointer}/ci/labels")),
                        format!(
                            "`labels` in {place} apply only to woodpecker sources; `{}` is an azure-pipelines source",
                            raw.ci.source
                        ),
                        Some("azure pools select jobs with `capabilities`".to_owned()),
                    );
                    ok = false;
                }
                if raw.ci.azure_pool.is_none() {
                    self.problems.push(
                        self.key_span(&format!("{pointer}/ci")),
                        format!("missing key `azurePool` in `ci` of {place}"),
                        Some(format!(
                            "`{}` is an azure-pipelines source: name its agent pool, e.g. `azurePool: Default`",
                            raw.ci.source
                        )),
                    );
                    ok = false;
                }
            }
            Some(CiKind::Forgejo { .. }) => {
                ok &= self.no_azure_keys(
                    &raw,
                    &pointer,
                    &place,
                    "forgejo",
                    "forgejo pools offer runner `labels` (`name: how`), matched against a job's `runs-on`",
                );
                for (name, how) in &raw.ci.labels {
                    let bad = |text: &str| text.contains([',', ':']) || text.chars().any(char::is_whitespace);
                    if name.is_empty()
                        || bad(name)
                        || name.starts_with('!')
                        || how.contains(',')
                        || how.chars().any(char::is_whitespace)
                    {
                        let escaped = super::check::pointer(&[Seg::Key(name.clone())]);
                        self.problems.push(
                            self.key_span(&format!("{pointer}/ci/labels{escaped}")),
                            format!("invalid runner label `{name}: {how}` in {place}"),
                            Some("write `name: how`, e.g. `debian: docker://node:22-bookworm` or `linux: host` (a name has no `:`, `,`, `!` or spaces)".to_owned()),
                        );
                        ok = false;
                    }
                }
                if raw.ci.labels.is_empty() {
                    self.problems.push(
                        self.key_span(&format!("{pointer}/ci")),
                        format!("{place} offers no runner labels, so no Forgejo job could run on it"),
                        Some("add `labels:` with the names jobs use in `runs-on`, e.g. `labels: {debian: \"docker://node:22-bookworm\"}`".to_owned()),
                    );
                    ok = false;
                }
            }
            Some(CiKind::Github(_)) => {
                ok &= self.no_azure_keys(
                    &raw,
                    &pointer,
                    &place,
                    "github",
                    "github pools offer runner labels: `labels: {gpu: \"\"}`, matched against `runs-on`",
                );
                // A GitHub runner label is a name; the planner and the runner see only the key.
                for (key, value) in &raw.ci.labels {
                    if !value.is_empty() || key.starts_with('!') || key.starts_with("ciscale.") {
                        let escaped = super::check::pointer(&[Seg::Key(key.clone())]);
                        self.problems.push(
                            self.key_span(&format!("{pointer}/ci/labels{escaped}")),
                            format!("label `{key}` in {place} is not a github runner label"),
                            Some(format!(
                                "github runner labels are names, matched against a job's `runs-on`: write `{}: \"\"`",
                                key.trim_start_matches('!')
                            )),
                        );
                        ok = false;
                    }
                }
            }
            Some(CiKind::Fake(_)) | None => {}
        }
        // Forgejo's and GitHub's runner labels were checked above, by their own grammar.
        let forgejo_source = matches!(
            ci.get(&CiName::new(raw.ci.source.clone())).map(|source| &source.kind),
            Some(CiKind::Forgejo { .. } | CiKind::Github(_))
        );
        for (key, value) in raw.ci.labels.iter().filter(|_| !forgejo_source) {
            if let Some(why) = woodpecker_label_problem(key, value) {
                let escaped = super::check::pointer(&[Seg::Key(key.clone())]);
                let span = self.key_span(&format!("{pointer}/ci/labels{escaped}"));
                self.problems.push(
                    span,
                    format!("invalid label `{key}` in {place}: {why}"),
                    Some("write `key: value`, `key: \"*\"` or `\"!key\": value` (agents take jobs whose labels they match)".to_owned()),
                );
                ok = false;
            }
        }

        // Backend binding.
        if !backend_names.contains(&raw.backend.name) {
            self.unknown_reference(
                &format!("{pointer}/backend/name"),
                "backend",
                &raw.backend.name,
                &place,
                backend_names,
                "backends",
            );
            ok = false;
        }
        let billing = backends.get(&BackendName::new(raw.backend.name.clone())).map(|backend| backend.billing);

        let mode = match &raw.backend.start_stop {
            None => InstanceMode::Create,
            Some(start_stop) => {
                let instances_pointer = format!("{pointer}/backend/startStop/instances");
                if start_stop.instances.is_empty() {
                    self.problems.push(
                        self.key_span(&instances_pointer),
                        format!("`startStop.instances` of {place} is empty"),
                        Some(
                            "name at least one instance to adopt, or remove `startStop` to create instances".to_owned(),
                        ),
                    );
                    ok = false;
                }
                let mut instances = Vec::new();
                for (index, adopted) in start_stop.instances.iter().enumerate() {
                    let item = format!("{instances_pointer}/{index}");
                    let id_span = self.value_span(&format!("{item}/id"));
                    if let Some((other_pool, first)) = adopted_by.get(&adopted.id) {
                        let other_pool = other_pool.clone();
                        let first = *first;
                        self.problems.push_related(
                            id_span,
                            format!("instance `{}` is adopted twice (by pool `{other_pool}` and {place})", adopted.id),
                            Some("an instance can belong to one pool only".to_owned()),
                            first.map(|span| (span, "first adopted here")),
                        );
                        ok = false;
                    } else {
                        adopted_by.insert(adopted.id.clone(), (raw.name.clone(), id_span));
                    }
                    let agent = match (&adopted.agent_id, &adopted.agent_name) {
                        (Some(_), Some(_)) => {
                            self.problems.push(
                                self.key_span(&format!("{item}/agentName")),
                                format!("instance `{}` of {place} sets both `agentId` and `agentName`", adopted.id),
                                Some(
                                    "keep one: `agentId` names the agent by its CI id, `agentName` by its name"
                                        .to_owned(),
                                ),
                            );
                            ok = false;
                            None
                        }
                        (Some(id), None) => Some(AgentRef::Id(AgentId::new(id.clone()))),
                        (None, Some(name)) => Some(AgentRef::Name(name.clone())),
                        (None, None) => None,
                    };
                    instances.push(AdoptedInstance { id: InstanceId::new(adopted.id.clone()), agent });
                }
                InstanceMode::StartStop { instances }
            }
        };

        let scale = self.scale(pointer, &place, raw.scale.clone().unwrap_or_default(), &mode, billing);
        let agent = raw.agent.clone().unwrap_or_default();
        let preregistered = self.preregistered(pointer, &place, &agent, &mode, scale.as_ref());
        // Cloud backends boot the agent from cloud-init, as the CI source's launch says: an agent container (the
        // pool's `agent.image`, else the source's default) or user data the source writes itself. A source
        // without a default image (Azure: Microsoft publishes none) needs the pool to name one.
        let launch = ci
            .get(&CiName::new(raw.ci.source.clone()))
            .map(|source| crate::providers::ci_capabilities(&source.kind).launch);
        let needs_image = match launch.map(|launch| launch.cloud) {
            Some(crate::providers::CloudLaunch::Docker { default_image: None, needs }) => Some(needs),
            _ => None,
        };
        let cloud = backends
            .get(&BackendName::new(raw.backend.name.clone()))
            .filter(|backend| matches!(backend.kind, BackendKind::Hcloud { .. } | BackendKind::Aws { .. }));
        // A source that writes its own cloud user data (Forgejo) needs what that download is: its pinned release.
        let forgejo_without_release = matches!(
            ci.get(&CiName::new(raw.ci.source.clone())).map(|source| &source.kind),
            Some(CiKind::Forgejo { runner_release: None, .. })
        );
        if let Some(cloud) = cloud.filter(|_| forgejo_without_release && matches!(mode, InstanceMode::Create)) {
            self.problems.push(
                self.value_span(&format!("{pointer}/backend/name"))
                    .or_else(|| self.value_span(&format!("{pointer}/name"))),
                format!(
                    "{place} runs Forgejo runners on backend `{}` ({}), whose servers download forgejo-runner, but ci \
                     source `{}` names no `runnerRelease`",
                    raw.backend.name,
                    cloud.kind.name(),
                    raw.ci.source
                ),
                Some(format!(
                    "add `runnerRelease: {{version: 12.10.1, sha256: ...}}` to ci source `{}` (the digest from the \
                     release's `.sha256` file), or run the pool on Incus with an image from `ciscale provision`",
                    raw.ci.source
                )),
            );
            ok = false;
        }
        if let (Some(cloud), Some(needs), Some(launch)) =
            (cloud.filter(|_| agent.image.is_none() && matches!(mode, InstanceMode::Create)), needs_image, launch)
        {
            let span =
                self.key_span(&format!("{pointer}/agent")).or_else(|| self.value_span(&format!("{pointer}/name")));
            self.problems.push(
                span,
                format!(
                    "{place} runs {} agents on backend `{}` ({}) but sets no `agent.image`, and the ci source has \
                     no default agent image for cloud servers",
                    launch.agent,
                    raw.backend.name,
                    cloud.kind.name()
                ),
                Some(needs.to_owned()),
            );
            ok = false;
        }
        // A source whose agents each serve the one job they were registered for (Forgejo): one agent per waiting
        // job, made for it, gone after it. An agent kept warm, or a machine started again, would serve no job.
        let capabilities =
            ci.get(&CiName::new(raw.ci.source.clone())).map(|source| crate::providers::ci_capabilities(&source.kind));
        let mut scale = scale;
        if let (Some(_), Some(scale)) = (capabilities.filter(|c| c.job_bound), scale.as_mut()) {
            let why = "its ci source binds every agent to one waiting job, so ciscale makes one per waiting job";
            let windows = scale
                .schedule
                .iter()
                .any(|window| window.min.is_some_and(|min| min > 0) || window.min_idle.is_some_and(|idle| idle > 0));
            for (field, value) in [("min", scale.min), ("minIdle", scale.min_idle), ("schedule", u32::from(windows))] {
                if value > 0 {
                    let at = format!("{pointer}/scale/{field}");
                    self.problems.push(
                        self.value_span(&at).or_else(|| self.key_span(&at)),
                        format!("`{field}` of {place} must be 0 (or leave it out): {why}"),
                        Some("an agent made for no job would take none: demand alone sizes the pool".to_owned()),
                    );
                    ok = false;
                }
            }
            if scale.jobs_per_agent > 1 {
                let at = format!("{pointer}/scale/jobsPerAgent");
                self.problems.push(
                    self.value_span(&at),
                    format!("`jobsPerAgent` of {place} must be 1: its ci source binds every agent to one job"),
                    None,
                );
                ok = false;
            }
            if !matches!(mode, InstanceMode::Create) {
                self.problems.push(
                    self.key_span(&format!("{pointer}/backend/instances"))
                        .or_else(|| self.value_span(&format!("{pointer}/name"))),
                    format!("{place} starts and stops named instances, but {why}"),
                    Some("let ciscale create the pool's instances (drop `startStop`)".to_owned()),
                );
                ok = false;
            }
        }
        if let (Some(capabilities), Some(scale)) = (capabilities, scale.as_mut()) {
            // An agent that runs one job and is gone is what `ephemeral` means: say it once, here.
            scale.ephemeral |= capabilities.single_job;
        }
        let (Some(scale), true, Ok(preregistered)) = (scale, ok, preregistered) else {
            return None;
        };
        let github_platform = match ci.get(&CiName::new(raw.ci.source.clone())).map(|source| &source.kind) {
            Some(CiKind::Github(spec)) => Some(crate::providers::github::platform_of(spec)),
            _ => None,
        };
        Some(PoolSpec {
            name: PoolName::new(raw.name),
            ci: CiBinding {
                source: CiName::new(raw.ci.source),
                // The Azure agent pool is one more label the agents offer (Azure pools have no other labels).
                labels: {
                    let mut labels = raw.ci.labels;
                    if let Some(azure_pool) = raw.ci.azure_pool {
                        labels.insert(crate::model::AZURE_POOL_LABEL.to_owned(), azure_pool);
                    }
                    if let Some(platform) = github_platform {
                        // Every GitHub runner carries `self-hosted` and its OS and architecture (ciscale registers
                        // them: a just-in-time runner gets no others), so jobs written for any self-hosted runner
                        // match the pool.
                        for implicit in platform.implicit_labels() {
                            if !labels.keys().any(|label| label.eq_ignore_ascii_case(implicit)) {
                                labels.insert(implicit.to_owned(), String::new());
                            }
                        }
                    }
                    labels
                },
                capabilities: raw.ci.capabilities,
            },
            backend: BackendBinding { backend: BackendName::new(raw.backend.name), mode, machine: raw.backend.machine },
            agent: AgentSpec {
                image: agent.image,
                env: agent.env,
                secret_env: agent.secret_env.into_iter().map(|(key, value)| (key, Secret::new(value.0))).collect(),
                preregistered,
            },
            scale,
        })
    }

    /// `agent.preregistered` (Picus mode): one id or one name, on a pool that creates at most one instance (one
    /// agent identity cannot run on two machines at once).
    fn preregistered(
        &mut self,
        pointer: &str,
        place: &str,
        agent: &crate::config::raw::RawAgent,
        mode: &InstanceMode,
        scale: Option<&ScalePolicy>,
    ) -> Result<Option<AgentRef>, ()> {
        let Some(reference) = &agent.preregistered else {
            return Ok(None);
        };
        let at = format!("{pointer}/agent/preregistered");
        let agent_ref = match (&reference.id, &reference.name) {
            (Some(id), None) => AgentRef::Id(AgentId::new(id.clone())),
            (None, Some(name)) => AgentRef::Name(name.clone()),
            _ => {
                self.problems.push(
                    self.key_span(&at),
                    format!("`agent.preregistered` of {place} needs exactly one of `id` and `name`"),
                    Some("e.g. `preregistered: { id: \"1\" }` with the id from the CI's agent list".to_owned()),
                );
                return Err(());
            }
        };
        if matches!(mode, InstanceMode::StartStop { .. }) {
            self.problems.push(
                self.key_span(&at),
                format!("`agent.preregistered` of {place} cannot be used with `startStop`"),
                Some("name the agent of each adopted instance with `agentId` or `agentName` instead".to_owned()),
            );
            return Err(());
        }
        if let Some(scale) = scale.filter(|scale| scale.max > 1) {
            self.problems.push(
                self.key_span(&at),
                format!("{place} has a pre-registered agent but `max` is {}", scale.max),
                Some("one pre-registered agent can run on one instance only: set `scale.max: 1`".to_owned()),
            );
            return Err(());
        }
        Ok(Some(agent_ref))
    }

    fn scale(
        &mut self,
        pool_pointer: &str,
        place: &str,
        raw: RawScale,
        mode: &InstanceMode,
        billing: Option<Billing>,
    ) -> Option<ScalePolicy> {
        let defaults = ScalePolicy::default();
        let at = |field: &str| format!("{pool_pointer}/scale/{field}");
        let place_suffix = format!(" in {place}");
        let mut ok = true;

        let adopted = match mode {
            InstanceMode::StartStop { instances } => Some(u32::try_from(instances.len()).unwrap_or(u32::MAX)),
            InstanceMode::Create => None,
        };
        // A start/stop pool cannot grow beyond the instances it adopted, so that is its natural cap.
        let max = raw.max.or(adopted.filter(|count| *count > 0)).unwrap_or(defaults.max);
        let min = raw.min.unwrap_or(defaults.min);
        let min_idle = raw.min_idle.unwrap_or(defaults.min_idle);
        let (min_known, max_known, min_idle_known) =
            (!self.is_broken(&at("min")), !self.is_broken(&at("max")), !self.is_broken(&at("minIdle")));
        if min_known && max_known && min > max {
            self.problems.push(
                self.value_span(&at("min")).or_else(|| self.value_span(&at("max"))),
                format!("`min` ({min}) is greater than `max` ({max}){place_suffix}"),
                Some(format!("lower `min` or raise `max` to at least {min}")),
            );
            ok = false;
        }
        if min_idle_known && max_known && min_idle > max {
            self.problems.push(
                self.value_span(&at("minIdle")),
                format!("`minIdle` ({min_idle}) is greater than `max` ({max}){place_suffix}"),
                Some(format!("lower `minIdle` or raise `max` to at least {min_idle}")),
            );
            ok = false;
        }
        if let (Some(count), Some(explicit_max)) = (adopted, raw.max) {
            if max_known && count > 0 && explicit_max > count {
                self.problems.push(
                    self.value_span(&at("max")),
                    format!("`max` ({explicit_max}) is more than the {count} adopted instance(s){place_suffix}"),
                    Some(
                        "a start/stop pool only starts the instances it names: add instances or lower `max`".to_owned(),
                    ),
                );
                ok = false;
            }
        }

        let idle_timeout = self.duration(
            &at("idleTimeout"),
            "idleTimeout",
            &place_suffix,
            raw.idle_timeout.as_deref(),
            defaults.idle_timeout,
        );
        let bootstrap_timeout = self.duration(
            &at("bootstrapTimeout"),
            "bootstrapTimeout",
            &place_suffix,
            raw.bootstrap_timeout.as_deref(),
            defaults.bootstrap_timeout,
        );
        let breaker_cooldown = self.duration(
            &at("breakerCooldown"),
            "breakerCooldown",
            &place_suffix,
            raw.breaker_cooldown.as_deref(),
            defaults.breaker_cooldown,
        );
        let default_margin = defaults.billing_margin.unwrap_or(GoDuration::from_secs(5 * 60));
        let margin = self.duration(
            &at("billingMargin"),
            "billingMargin",
            &place_suffix,
            raw.billing_margin.as_deref(),
            default_margin,
        );
        if let Some(margin) = margin.filter(|margin| margin.as_secs() >= 3600) {
            self.problems.push(
                self.value_span(&at("billingMargin")),
                format!("`billingMargin` ({margin}){place_suffix} must be shorter than the 1h billing period"),
                Some("write e.g. `5m`".to_owned()),
            );
            ok = false;
        }
        let billing_aware = raw.billing_aware.unwrap_or(true);
        let billing_margin = match billing {
            Some(Billing::Hourly) if billing_aware => Some(margin?),
            _ => None,
        };
        let schedule = self.schedule(&at("schedule"), &place_suffix, &raw.schedule, (min, max, min_idle));
        if !ok {
            return None;
        }
        Some(ScalePolicy {
            schedule: schedule?,
            min,
            max,
            min_idle,
            jobs_per_agent: raw.jobs_per_agent.unwrap_or(defaults.jobs_per_agent),
            idle_timeout: idle_timeout?,
            ephemeral: raw.ephemeral.unwrap_or(defaults.ephemeral),
            bootstrap_timeout: bootstrap_timeout?,
            billing_margin,
            breaker_threshold: raw.breaker_threshold.unwrap_or(defaults.breaker_threshold),
            breaker_cooldown: breaker_cooldown?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_hints_translate_words_to_go_units() {
        assert_eq!(duration_hint("5 minutes"), "write `5m`");
        assert_eq!(duration_hint("1 hour 30 min"), "write `1h30m`");
        assert_eq!(duration_hint("2 days"), "write `48h`");
        assert_eq!(duration_hint("soon"), "write a Go duration such as `30s`, `5m` or `1h30m`");
        assert_eq!(duration_hint("5 fortnights"), "write a Go duration such as `30s`, `5m` or `1h30m`");
    }

    #[test]
    fn go_form_is_what_go_parses() {
        for good in ["0", "10s", "1h30m", "1.5h", "300ms", "2h45m10s"] {
            assert!(is_go_form(good), "{good}");
        }
        for bad in ["", "5 minutes", "5", "1d", "-5s", "h", "1.s", "10 s", "1hour"] {
            assert!(!is_go_form(bad), "{bad}");
        }
    }

    #[test]
    fn loopback_urls_are_told_apart() {
        for local in [
            "http://127.0.0.1:4000",
            "http://localhost/v1",
            "https://[::1]:8443/x",
            "127.0.0.2:9000",
            "http://u:p@localhost",
        ] {
            assert!(is_loopback_url(local), "{local}");
        }
        for remote in [
            "https://api.hetzner.cloud/v1",
            "https://dev.azure.com/acme",
            "http://10.0.0.1",
            "ci.example.com:9000",
            "http://localhost.example.com",
        ] {
            assert!(!is_loopback_url(remote), "{remote}");
        }
    }

    #[test]
    fn names_follow_the_label_alphabet() {
        assert!(is_valid_name("acme-2"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("Acme"));
        assert!(!is_valid_name("a_b"));
        assert!(!is_valid_name(&"a".repeat(31)));
        assert!(is_valid_name(&"a".repeat(30)));
    }
}
