//! Meaning: turns the structurally checked, interpolated document into [`Desired`], checking what a schema
//! cannot say (references between sections, `min <= max`, durations, name formats, duplicates), each problem at
//! its place. Sections are converted one by one so a broken pool does not hide the problems of the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::check::{Checked, Seg};
use super::diag::{backticked, did_you_mean, Problems, Span};
use super::raw::{RawBackend, RawCiSource, RawImage, RawJobFeed, RawPool, RawScale, RawSimulation};
use crate::simulate::models::Overrides;
use crate::model::{
    AdoptedInstance, AgentId, AgentRef, AgentSpec, BackendBinding, BackendKind, BackendName,
    BackendSpec, Billing, CiBinding, CiKind, CiName, CiSourceSpec, Desired, FakeSpec, GoDuration, JobFeed,
    CreateLimit, CreateRate, CronPattern, ImageSpec, InstanceId, InstanceMode, MetricsSpec, PoolName, PoolSpec,
    ScalePolicy, ScheduleWindow, Secret,
};

use crate::plan::MAX_OWNER_AND_POOL_LEN;

const DEFAULT_POLL_INTERVAL: GoDuration = GoDuration::from_secs(10);
const DEFAULT_IMAGE_KEEP: u32 = 3;

/// `[a-z0-9-]{1,30}`: owner ids and pool names go into labels and instance names.
fn is_valid_name(name: &str) -> bool {
    (1..=30).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
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
        let digits = rest
            .find(|ch: char| !ch.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        if let Some(fraction) = rest.strip_prefix('.') {
            let digits = fraction
                .find(|ch: char| !ch.is_ascii_digit())
                .unwrap_or(fraction.len());
            if digits == 0 {
                return false;
            }
            rest = &fraction[digits..];
        }
        let Some(unit) = ["ms", "us", "µs", "ns", "h", "m", "s"]
            .iter()
            .find(|unit| rest.starts_with(**unit))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

fn ptr(segments: &[&str]) -> String {
    let path: Vec<Seg> = segments
        .iter()
        .map(|segment| Seg::Key((*segment).to_owned()))
        .collect();
    super::check::pointer(&path)
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
        let number_len = rest
            .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return fallback;
        }
        let (number, tail) = rest.split_at(number_len);
        let tail = tail.trim_start();
        let unit_len = tail
            .find(|ch: char| !ch.is_ascii_alphabetic())
            .unwrap_or(tail.len());
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
                rest = tail
                    .trim_start_matches([' ', ','])
                    .trim_start_matches("and ")
                    .trim_start();
                continue;
            }
            _ => return fallback,
        };
        out.push_str(number);
        out.push_str(unit);
        rest = tail
            .trim_start_matches([' ', ','])
            .trim_start_matches("and ")
            .trim_start();
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
        CiKind::Woodpecker { server, .. } if !is_loopback_url(server) => local(
            GoDuration::from_secs(1),
            "every cycle asks your Woodpecker server for its queue and its agents",
        ),
        CiKind::AzurePipelines { organization_url, .. } if !is_loopback_url(organization_url) => local(
            GoDuration::from_secs(5),
            "Azure DevOps throttles each identity by the load of its requests over 5-minute windows, and every \
             cycle costs two calls per bound agent pool",
        ),
        _ => local(LOOPBACK_POLL_FLOOR, "nothing but this machine's CPU is spent on each cycle"),
    }
}

impl Validator<'_> {
    fn value_span(&self, pointer: &str) -> Option<Span> {
        self.checked.value_span(pointer)
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
                        Some("five fields: minute hour day-of-month month day-of-week, e.g. `* 8-17 * * 1-5`".to_owned()),
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
                    self.value_span(&at("max")).or_else(|| self.value_span(&at("min"))).or_else(|| self.value_span(&at("minIdle"))),
                    format!(
                        "schedule `{name}`{place_suffix} gives min {w_min}, minIdle {w_idle} above max {w_max}"
                    ),
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
        let parsed = if is_go_form(raw) {
            raw.parse::<GoDuration>().ok()
        } else {
            None
        };
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

    fn resolve_path(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
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

        let owner = self
            .document
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Some(owner) = &owner {
            if !is_valid_name(owner) {
                self.problems.push(
                    self.value_span("/id"),
                    format!("invalid owner id `{owner}`"),
                    Some("use 1 to 30 of `a-z`, `0-9` and `-`: it goes into labels and instance names".to_owned()),
                );
            }
        }
        let poll_raw = self
            .document
            .get("pollInterval")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let poll_interval = self.duration(
            "/pollInterval",
            "pollInterval",
            "",
            poll_raw.as_deref(),
            DEFAULT_POLL_INTERVAL,
        );

        // -- ci sources ---------------------------------------------------------------------------------------
        let ci_names = self.object_keys("/ci");
        let mut ci = BTreeMap::new();
        for name in &ci_names {
            let pointer = ptr(&["ci", name]);
            let Some(raw) = self.section::<RawCiSource>(&pointer, &format!("ci source `{name}`"))
            else {
                complete = false;
                continue;
            };
            let kind = match raw {
                RawCiSource::Woodpecker {
                    server,
                    token,
                    grpc_address,
                } => CiKind::Woodpecker {
                    server,
                    token: Secret::new(token.0),
                    grpc_address,
                },
                RawCiSource::AzurePipelines {
                    organization_url,
                    pat,
                    agent_pat,
                } => CiKind::AzurePipelines {
                    organization_url,
                    pat: Secret::new(pat.0),
                    agent_pat: agent_pat.map(|agent_pat| Secret::new(agent_pat.0)),
                },
                RawCiSource::Fake {
                    state_file,
                    simulate,
                    jobs,
                } => {
                    let mut spec = self.fake_spec(state_file, simulate);
                    spec.jobs = jobs.and_then(|jobs| self.job_feed(&pointer, jobs));
                    CiKind::Fake(spec)
                }
            };
            ci.insert(CiName::new(name.clone()), CiSourceSpec { kind });
        }

        // -- backends -----------------------------------------------------------------------------------------
        let backend_names = self.object_keys("/backends");
        let mut backends = BTreeMap::new();
        for name in &backend_names {
            let pointer = ptr(&["backends", name]);
            let Some(raw) = self.section::<RawBackend>(&pointer, &format!("backend `{name}`"))
            else {
                complete = false;
                continue;
            };
            let (kind, billing, create_rate, create_burst, simulation) = match raw {
                RawBackend::Hcloud {
                    token,
                    endpoint,
                    billing,
                    create_rate,
                    create_burst,
                    simulation,
                } => (
                    BackendKind::Hcloud {
                        token: Secret::new(token.0),
                        endpoint,
                    },
                    billing.unwrap_or(Billing::Hourly),
                    create_rate,
                    create_burst,
                    simulation,
                ),
                RawBackend::Aws {
                    region,
                    endpoint,
                    billing,
                    create_rate,
                    create_burst,
                    simulation,
                } => (
                    BackendKind::Aws { region, endpoint },
                    billing.unwrap_or(Billing::PerSecond),
                    create_rate,
                    create_burst,
                    simulation,
                ),
                RawBackend::Incus {
                    socket,
                    project,
                    billing,
                    create_rate,
                    create_burst,
                    simulation,
                } => (
                    BackendKind::Incus { socket, project },
                    billing.unwrap_or(Billing::PerSecond),
                    create_rate,
                    create_burst,
                    simulation,
                ),
                RawBackend::Fake {
                    state_file,
                    simulate,
                    billing,
                    create_rate,
                    create_burst,
                    simulation,
                } => (
                    BackendKind::Fake(self.fake_spec(state_file, simulate)),
                    billing.unwrap_or(Billing::PerSecond),
                    create_rate,
                    create_burst,
                    simulation,
                ),
            };
            let create_limit = self.create_limit(&pointer, name, create_rate.as_deref(), create_burst);
            if let Some(simulation) = simulation {
                let overrides = self.simulation(&pointer, simulation);
                self.simulation.insert(BackendName::new(name.clone()), overrides);
            }
            backends.insert(
                BackendName::new(name.clone()),
                BackendSpec { kind, billing, create_limit },
            );
        }

        if let Some(interval) = poll_interval {
            self.check_poll_interval(interval, &ci, &backends);
        }

        // -- pools --------------------------------------------------------------------------------------------
        let pool_count = self
            .document
            .get("pools")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let mut pools = Vec::new();
        let mut first_pool_at: BTreeMap<String, Option<Span>> = BTreeMap::new();
        let mut adopted_by: BTreeMap<String, (String, Option<Span>)> = BTreeMap::new();
        for index in 0..pool_count {
            let pointer = format!("/pools/{index}");
            let Some(raw) = self.section::<RawPool>(&pointer, &format!("pool #{}", index + 1))
            else {
                complete = false;
                continue;
            };
            let name_span = self.value_span(&format!("{pointer}/name"));
            match first_pool_at.get(&raw.name) {
                Some(first) => {
                    let first_line = first
                        .map(|span| format!(" (line {})", span.line))
                        .unwrap_or_default();
                    self.problems.push_related(
                        name_span,
                        format!("duplicate pool name `{}`", raw.name),
                        Some(format!("pool names must be unique; the first `{}` is defined earlier{first_line}", raw.name)),
                        first.map(|span| (span, "first defined here")),
                    );
                }
                None => {
                    first_pool_at.insert(raw.name.clone(), name_span);
                }
            }
            if let Some(pool) = self.pool(
                &pointer,
                raw,
                &ci,
                &ci_names,
                &backends,
                &backend_names,
                &mut adopted_by,
            ) {
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
                    scripts: raw
                        .scripts
                        .iter()
                        .map(|script| self.resolve_path(script))
                        .collect(),
                    keep: raw.keep.unwrap_or(DEFAULT_IMAGE_KEEP),
                    agent_url: raw.agent_url,
                },
            );
        }

        let raw_metrics = self.section::<crate::config::raw::RawMetrics>("/metrics", "`metrics`");
        let metrics = match &raw_metrics {
            None => None,
            Some(metrics) => match metrics.listen.parse::<std::net::SocketAddr>() {
                Ok(listen) => Some(MetricsSpec { listen, unhealthy_after: metrics.unhealthy_after.unwrap_or(3).max(1) }),
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
        let where_ = if span.is_some() { format!("`pollInterval` {interval}") } else { format!("the default `pollInterval` {interval}") };
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
        self.problems.push(
            self.value_span(pointer),
            format!("unknown {what} `{name}` in {place}"),
            Some(hint),
        );
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
                Some(
                    "use 1 to 30 of `a-z`, `0-9` and `-`: it goes into labels and instance names"
                        .to_owned(),
                ),
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
        match ci
            .get(&CiName::new(raw.ci.source.clone()))
            .map(|source| &source.kind)
        {
            Some(CiKind::Woodpecker { .. }) => {
                for key in ["azurePool", "capabilities"] {
                    let present = match key {
                        "azurePool" => raw.ci.azure_pool.is_some(),
                        _ => !raw.ci.capabilities.is_empty(),
                    };
                    if present {
                        self.problems.push(
                            self.key_span(&format!("{pointer}/ci/{key}")),
                            format!("`{key}` in {place} applies only to azure-pipelines sources; `{}` is a woodpecker source", raw.ci.source),
                            Some("woodpecker pools select jobs with `labels`".to_owned()),
                        );
                        ok = false;
                    }
                }
            }
            Some(CiKind::AzurePipelines { .. }) => {
                if !raw.ci.labels.is_empty() {
                    self.problems.push(
                        self.key_span(&format!("{pointer}/ci/labels")),
                        format!("`labels` in {place} apply only to woodpecker sources; `{}` is an azure-pipelines source", raw.ci.source),
                        Some("azure pools select jobs with `capabilities`".to_owned()),
                    );
                    ok = false;
                }
                if raw.ci.azure_pool.is_none() {
                    self.problems.push(
                        self.key_span(&format!("{pointer}/ci")),
                        format!("missing key `azurePool` in `ci` of {place}"),
                        Some(format!("`{}` is an azure-pipelines source: name its agent pool, e.g. `azurePool: Default`", raw.ci.source)),
                    );
                    ok = false;
                }
            }
            Some(CiKind::Fake(_)) | None => {}
        }
        for (key, value) in &raw.ci.labels {
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
        let billing = backends
            .get(&BackendName::new(raw.backend.name.clone()))
            .map(|backend| backend.billing);

        let mode = match &raw.backend.start_stop {
            None => InstanceMode::Create,
            Some(start_stop) => {
                let instances_pointer = format!("{pointer}/backend/startStop/instances");
                if start_stop.instances.is_empty() {
                    self.problems.push(
                        self.key_span(&instances_pointer),
                        format!("`startStop.instances` of {place} is empty"),
                        Some("name at least one instance to adopt, or remove `startStop` to create instances".to_owned()),
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
                                Some("keep one: `agentId` names the agent by its CI id, `agentName` by its name".to_owned()),
                            );
                            ok = false;
                            None
                        }
                        (Some(id), None) => Some(AgentRef::Id(AgentId::new(id.clone()))),
                        (None, Some(name)) => Some(AgentRef::Name(name.clone())),
                        (None, None) => None,
                    };
                    instances.push(AdoptedInstance {
                        id: InstanceId::new(adopted.id.clone()),
                        agent,
                    });
                }
                InstanceMode::StartStop { instances }
            }
        };

        let scale = self.scale(
            pointer,
            &place,
            raw.scale.clone().unwrap_or_default(),
            &mode,
            billing,
        );
        let agent = raw.agent.clone().unwrap_or_default();
        let preregistered = self.preregistered(pointer, &place, &agent, &mode, scale.as_ref());
        // Cloud backends boot `agent.image` from cloud-init, and its default is Woodpecker's agent: an Azure
        // Pipelines pool there must name its own until CI sources carry their own launch defaults.
        let azure_source = matches!(
            ci.get(&CiName::new(raw.ci.source.clone())).map(|source| &source.kind),
            Some(CiKind::AzurePipelines { .. })
        );
        let cloud = backends
            .get(&BackendName::new(raw.backend.name.clone()))
            .filter(|backend| matches!(backend.kind, BackendKind::Hcloud { .. } | BackendKind::Aws { .. }));
        if let Some(cloud) = cloud.filter(|_| azure_source && agent.image.is_none() && matches!(mode, InstanceMode::Create)) {
            let span = self.key_span(&format!("{pointer}/agent")).or_else(|| self.value_span(&format!("{pointer}/name")));
            self.problems.push(
                span,
                format!(
                    "{place} runs Azure Pipelines agents on backend `{}` ({}) but sets no `agent.image`",
                    raw.backend.name,
                    cloud.kind.name()
                ),
                Some(
                    "the default agent image is Woodpecker's: set `agent.image` to an Azure Pipelines agent container \
                     image that registers itself from `AZP_URL`, `AZP_POOL`, `AZP_AGENT_NAME` and its token"
                        .to_owned(),
                ),
            );
            ok = false;
        }
        let (Some(scale), true, Ok(preregistered)) = (scale, ok, preregistered) else {
            return None;
        };
        Some(PoolSpec {
            name: PoolName::new(raw.name),
            ci: CiBinding {
                source: CiName::new(raw.ci.source),
                labels: raw.ci.labels,
                azure_pool: raw.ci.azure_pool,
                capabilities: raw.ci.capabilities,
            },
            backend: BackendBinding {
                backend: BackendName::new(raw.backend.name),
                mode,
                machine: raw.backend.machine,
            },
            agent: AgentSpec {
                image: agent.image,
                env: agent.env,
                secret_env: agent
                    .secret_env
                    .into_iter()
                    .map(|(key, value)| (key, Secret::new(value.0)))
                    .collect(),
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
            InstanceMode::StartStop { instances } => {
                Some(u32::try_from(instances.len()).unwrap_or(u32::MAX))
            }
            InstanceMode::Create => None,
        };
        // A start/stop pool cannot grow beyond the instances it adopted, so that is its natural cap.
        let max = raw
            .max
            .or(adopted.filter(|count| *count > 0))
            .unwrap_or(defaults.max);
        let min = raw.min.unwrap_or(defaults.min);
        let min_idle = raw.min_idle.unwrap_or(defaults.min_idle);
        let (min_known, max_known, min_idle_known) = (
            !self.is_broken(&at("min")),
            !self.is_broken(&at("max")),
            !self.is_broken(&at("minIdle")),
        );
        if min_known && max_known && min > max {
            self.problems.push(
                self.value_span(&at("min"))
                    .or_else(|| self.value_span(&at("max"))),
                format!("`min` ({min}) is greater than `max` ({max}){place_suffix}"),
                Some(format!("lower `min` or raise `max` to at least {min}")),
            );
            ok = false;
        }
        if min_idle_known && max_known && min_idle > max {
            self.problems.push(
                self.value_span(&at("minIdle")),
                format!("`minIdle` ({min_idle}) is greater than `max` ({max}){place_suffix}"),
                Some(format!(
                    "lower `minIdle` or raise `max` to at least {min_idle}"
                )),
            );
            ok = false;
        }
        if let (Some(count), Some(explicit_max)) = (adopted, raw.max) {
            if max_known && count > 0 && explicit_max > count {
                self.problems.push(
                    self.value_span(&at("max")),
                    format!("`max` ({explicit_max}) is more than the {count} adopted instance(s){place_suffix}"),
                    Some("a start/stop pool only starts the instances it names: add instances or lower `max`".to_owned()),
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
        let default_margin = defaults
            .billing_margin
            .unwrap_or(GoDuration::from_secs(5 * 60));
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
        assert_eq!(
            duration_hint("soon"),
            "write a Go duration such as `30s`, `5m` or `1h30m`"
        );
        assert_eq!(
            duration_hint("5 fortnights"),
            "write a Go duration such as `30s`, `5m` or `1h30m`"
        );
    }

    #[test]
    fn go_form_is_what_go_parses() {
        for good in ["0", "10s", "1h30m", "1.5h", "300ms", "2h45m10s"] {
            assert!(is_go_form(good), "{good}");
        }
        for bad in [
            "",
            "5 minutes",
            "5",
            "1d",
            "-5s",
            "h",
            "1.s",
            "10 s",
            "1hour",
        ] {
            assert!(!is_go_form(bad), "{bad}");
        }
    }

    #[test]
    fn loopback_urls_are_told_apart() {
        for local in ["http://127.0.0.1:4000", "http://localhost/v1", "https://[::1]:8443/x", "127.0.0.2:9000", "http://u:p@localhost"] {
            assert!(is_loopback_url(local), "{local}");
        }
        for remote in ["https://api.hetzner.cloud/v1", "https://dev.azure.com/acme", "http://10.0.0.1", "ci.example.com:9000", "http://localhost.example.com"] {
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
