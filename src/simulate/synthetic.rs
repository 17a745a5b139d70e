//! Bundled synthetic traces, seeded: the same profile, seed, start, length and volume give the same jobs.
//!
//! Arrivals are a Poisson process whose rate is fixed within each hour and follows the profile's week (all
//! times UTC); each hour draws its jobs from its own generator (seeded by the seed and the hour), so any stretch
//! of time can be generated on its own and always gives the same jobs — the fake world's job feed relies on it.
//! Durations are log-normal (most jobs short, a long tail), cut to a range. Each job asks for what one of the
//! config's pools offers (chosen uniformly), so every pool gets work.
//!
//! - `office-week` — a small team's week (about 65 jobs a weekday, 6 on a weekend day at volume 1):
//!   weekdays 00–06 0.2 jobs/h, 06–08 1/h, 08–12 6/h, 12–13 3/h (lunch), 13–17 7/h, 17–19 2/h, 19–24 0.5/h;
//!   weekends 08–20 0.4/h, else 0.1/h. Durations: median 5 min, σ 0.8 (p95 ≈ 19 min), from 20 s to 60 min.
//! - `nightly-burst` — a nightly test matrix: every day at 02:00 a burst of about 40 jobs (Poisson) arriving
//!   within 5 minutes, median 12 min, σ 0.5, from 1 to 90 min; besides it weekdays 08–18 2 jobs/h and
//!   0.2 jobs/h otherwise, with `office-week`'s durations.
//! - `demo` — for watching the fake world live (`jobs:` of a fake CI): bursts of 4 minutes at 240 jobs/h
//!   every 10 minutes (minutes 0–3, 10–13, ...; about 96 jobs/h on average), around the clock; median 40 s,
//!   σ 0.5, from 10 s to 3 min. Agents come for each burst and are drained and deleted in the lull.
//!
//! `volume` multiplies every rate (and the burst size).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use jiff::civil::Weekday;
use jiff::{SignedDuration, Timestamp};

use super::trace::{Job, Trace};
use crate::model::{CiKind, CiName, Desired, Labels};
use crate::plan::matching::pool_takes;

/// The Monday synthetic traces start on unless told otherwise.
pub const DEFAULT_START: &str = "2026-03-02T00:00:00Z";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Profile {
    OfficeWeek,
    NightlyBurst,
    Demo,
}

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::OfficeWeek, Profile::NightlyBurst, Profile::Demo];

    pub fn name(self) -> &'static str {
        match self {
            Profile::OfficeWeek => "office-week",
            Profile::NightlyBurst => "nightly-burst",
            Profile::Demo => "demo",
        }
    }

    /// Jobs per hour arriving as a Poisson process in the hour starting at `hour` (UTC), at volume 1.
    fn hourly_rate(self, weekday: Weekday, hour: i8) -> f64 {
        let weekend = matches!(weekday, Weekday::Saturday | Weekday::Sunday);
        match self {
            Profile::OfficeWeek => match (weekend, hour) {
                (false, 0..=5) => 0.2,
                (false, 6..=7) => 1.0,
                (false, 8..=11) => 6.0,
                (false, 12) => 3.0,
                (false, 13..=16) => 7.0,
                (false, 17..=18) => 2.0,
                (false, _) => 0.5,
                (true, 8..=19) => 0.4,
                (true, _) => 0.1,
            },
            Profile::NightlyBurst => match (weekend, hour) {
                (false, 8..=17) => 2.0,
                _ => 0.2,
            },
            Profile::Demo => 240.0,
        }
    }

    /// Whether an arrival `offset` seconds into the hour is kept (thinning a Poisson process keeps it Poisson,
    /// at the lower rate, where it is kept).
    fn keeps(self, offset_secs: f64) -> bool {
        match self {
            // Four busy minutes in every ten: agents come for the burst and go in the lull.
            Profile::Demo => (offset_secs / 60.0) as i64 % 10 < 4,
            _ => true,
        }
    }

    /// A burst: (mean size, minute it starts, minutes it lasts), when the hour has one.
    fn burst(self, hour: i8) -> Option<(f64, i64, i64)> {
        match (self, hour) {
            (Profile::NightlyBurst, 2) => Some((40.0, 0, 5)),
            _ => None,
        }
    }

    fn durations(self, burst: bool) -> LogNormal {
        match (self, burst) {
            (Profile::NightlyBurst, true) => {
                LogNormal { median_secs: 720.0, sigma: 0.5, min_secs: 60.0, max_secs: 5400.0 }
            }
            (Profile::Demo, _) => LogNormal { median_secs: 40.0, sigma: 0.5, min_secs: 10.0, max_secs: 180.0 },
            _ => LogNormal { median_secs: 300.0, sigma: 0.8, min_secs: 20.0, max_secs: 3600.0 },
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Profile::ALL.into_iter().find(|profile| profile.name() == text.trim()).ok_or_else(|| {
            let names: Vec<String> = Profile::ALL.iter().map(|p| format!("`{}`", p.name())).collect();
            format!("`{text}` is not a synthetic trace; there are {}", names.join(", "))
        })
    }
}

struct LogNormal {
    median_secs: f64,
    sigma: f64,
    min_secs: f64,
    max_secs: f64,
}

impl LogNormal {
    fn sample(&self, rng: &mut fastrand::Rng) -> f64 {
        // Box–Muller: one standard normal from two uniforms (the first kept away from 0 for the logarithm).
        let u1 = 1.0 - rng.f64();
        let u2 = rng.f64();
        let normal = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        (self.median_secs * (self.sigma * normal).exp()).clamp(self.min_secs, self.max_secs)
    }
}

/// What a synthetic job asks for: the labels or demands one pool's agents take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTemplate {
    pub pool: String,
    pub ci: CiName,
    /// Shared by every job made from the template.
    pub labels: Labels,
    pub demands: Vec<String>,
}

/// One template per pool of the config (of the CI source `only`, when given), in config order: jobs that pool's
/// agents take by the CI's matching rule. Pools for which no such job can be written are left out and named.
pub fn templates_for(desired: &Desired, only: Option<&CiName>) -> (Vec<JobTemplate>, Vec<String>) {
    let mut templates = Vec::new();
    let mut skipped = Vec::new();
    for pool in desired.pools.iter().filter(|pool| only.is_none_or(|source| &pool.ci.source == source)) {
        let kind = desired.ci.get(&pool.ci.source).map(|spec| &spec.kind);
        let mut labels = BTreeMap::new();
        let mut demands = Vec::new();
        for (key, value) in &pool.ci.labels {
            match key.strip_prefix('!') {
                Some(required) => {
                    labels.insert(required.to_owned(), value.clone());
                }
                None if value != "*" => {
                    labels.insert(key.clone(), value.clone());
                }
                None => {}
            }
        }
        match kind {
            Some(CiKind::Woodpecker { .. }) => {
                // What the Woodpecker server puts on every task.
                labels.entry("repo".to_owned()).or_insert_with(|| "synthetic/app".to_owned());
                labels.insert("org-id".to_owned(), "1".to_owned());
            }
            // The pool's agent pool is among its offered labels already (`azure-pool`), so the job names it.
            Some(CiKind::AzurePipelines { .. }) => {}
            // `runs-on`: the job asks for every label name the pool's runners offer (ciscale's own keys aside).
            Some(CiKind::Forgejo { .. } | CiKind::Github(_)) => {
                demands.extend(labels.keys().filter(|name| !name.starts_with("ciscale.")).cloned());
                labels.clear();
            }
            Some(CiKind::Fake(_)) | None => {}
        }
        for (name, value) in &pool.ci.capabilities {
            demands.push(if value.is_empty() { name.clone() } else { format!("{name} -equals {value}") });
        }
        let labels = Labels::from(labels);
        if pool_takes(kind, pool, &labels, &demands) {
            templates.push(JobTemplate { pool: pool.name.to_string(), ci: pool.ci.source.clone(), labels, demands });
        } else {
            skipped.push(pool.name.to_string());
        }
    }
    (templates, skipped)
}

/// A synthetic trace: `days` days from `start`.
#[derive(Debug, Clone, PartialEq)]
pub struct Synthetic {
    pub profile: Profile,
    pub seed: u64,
    pub start: Timestamp,
    pub days: u32,
    pub volume: f64,
}

impl Synthetic {
    pub fn new(profile: Profile, seed: u64) -> Self {
        let start = DEFAULT_START.parse().unwrap_or(Timestamp::UNIX_EPOCH);
        Self { profile, seed, start, days: 7, volume: 1.0 }
    }

    pub fn until(&self) -> Timestamp {
        self.start.saturating_add(SignedDuration::from_hours(24 * i64::from(self.days))).unwrap_or(Timestamp::MAX)
    }

    /// Every job arriving in `[start, until)`.
    pub fn generate(&self, templates: &[JobTemplate]) -> Trace {
        Trace::new(jobs_between(self.profile, self.seed, self.volume, templates, self.start, self.until()))
    }
}

/// The jobs arriving in `[from, until)`: the same jobs however the stretch is cut into pieces.
pub fn jobs_between(
    profile: Profile,
    seed: u64,
    volume: f64,
    templates: &[JobTemplate],
    from: Timestamp,
    until: Timestamp,
) -> Vec<Job> {
    let mut jobs = Vec::new();
    if templates.is_empty() || from >= until {
        return jobs;
    }
    let first_hour = from.as_second().div_euclid(3600);
    let last_hour = (until.as_second() - 1).div_euclid(3600);
    for hour in first_hour..=last_hour {
        jobs.extend(
            hour_jobs(profile, seed, volume, templates, hour)
                .into_iter()
                .filter(|job| job.at >= from && job.at < until),
        );
    }
    jobs
}

/// The jobs of one hour (`hour` hours after the Unix epoch), from a generator of its own.
fn hour_jobs(profile: Profile, seed: u64, volume: f64, templates: &[JobTemplate], hour: i64) -> Vec<Job> {
    let Ok(hour_start) = Timestamp::from_second(hour * 3600) else {
        return Vec::new();
    };
    let civil = hour_start.to_zoned(jiff::tz::TimeZone::UTC);
    let (weekday, hour_of_day) = (civil.weekday(), civil.hour());
    let mut rng = fastrand::Rng::with_seed(mix(seed, hour as u64));
    let mut arrivals: Vec<(f64, bool)> = Vec::new();
    // Poisson arrivals: exponential gaps at the hour's rate.
    let rate = profile.hourly_rate(weekday, hour_of_day) * volume.max(0.0);
    if rate > 0.0 {
        let mut at = 0.0;
        loop {
            at += -(1.0 - rng.f64()).ln() / rate * 3600.0;
            if at >= 3600.0 {
                break;
            }
            if profile.keeps(at) {
                arrivals.push((at, false));
            }
        }
    }
    if let Some((mean, minute, minutes)) = profile.burst(hour_of_day) {
        for _ in 0..poisson(&mut rng, mean * volume.max(0.0)) {
            arrivals.push(((minute * 60) as f64 + rng.f64() * (minutes * 60) as f64, true));
        }
    }
    arrivals.sort_by(|a, b| a.0.total_cmp(&b.0));
    arrivals
        .into_iter()
        .map(|(offset, burst)| {
            let template = &templates[rng.usize(..templates.len())];
            let duration = profile.durations(burst).sample(&mut rng).round().max(1.0) as i64;
            Job {
                at: hour_start.saturating_add(SignedDuration::from_secs(offset as i64)).unwrap_or(hour_start),
                duration: SignedDuration::from_secs(duration),
                labels: template.labels.clone(),
                demands: template.demands.clone(),
                ci: Some(template.ci.clone()),
                id: None,
            }
        })
        .collect()
}

/// A Poisson count by Knuth's method for small means and a rounded normal for large ones.
fn poisson(rng: &mut fastrand::Rng, mean: f64) -> u64 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > 500.0 {
        let u1 = 1.0 - rng.f64();
        let normal = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * rng.f64()).cos();
        return (mean + mean.sqrt() * normal).round().max(0.0) as u64;
    }
    let limit = (-mean).exp();
    let mut product = rng.f64();
    let mut count = 0;
    while product > limit {
        count += 1;
        product *= rng.f64();
    }
    count
}

/// SplitMix64's finaliser over seed and hour: neighbouring hours get unrelated generators.
fn mix(seed: u64, hour: u64) -> u64 {
    let mut z = seed ^ hour.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Vec<JobTemplate> {
        vec![JobTemplate {
            pool: "linux".into(),
            ci: "ci".into(),
            labels: [("platform", "linux")].into(),
            demands: Vec::new(),
        }]
    }

    #[test]
    fn same_seed_same_jobs_different_seed_different_jobs() {
        let spec = Synthetic::new(Profile::OfficeWeek, 42);
        let a = spec.generate(&template());
        assert_eq!(a, spec.generate(&template()));
        let b = Synthetic { seed: 43, ..spec }.generate(&template());
        assert_ne!(a, b);
    }

    #[test]
    fn any_cut_of_the_time_gives_the_same_jobs() {
        let start: Timestamp = DEFAULT_START.parse().unwrap();
        let middle = start.checked_add(SignedDuration::from_secs(3 * 3600 + 1234)).unwrap();
        let end = start.checked_add(SignedDuration::from_hours(30)).unwrap();
        let whole = jobs_between(Profile::Demo, 7, 1.0, &template(), start, end);
        let mut pieces = jobs_between(Profile::Demo, 7, 1.0, &template(), start, middle);
        pieces.extend(jobs_between(Profile::Demo, 7, 1.0, &template(), middle, end));
        assert_eq!(whole, pieces);
        assert!(whole.len() > 2000, "{} jobs in 30 hours at about 96/h", whole.len());
        // Only in the busy minutes.
        assert!(whole.iter().all(|job| (job.at.as_second() / 60) % 10 < 4));
    }

    #[test]
    fn office_week_volume_and_shape_match_the_documentation() {
        // Averaged over many seeds: weekdays about 65 jobs, weekend days about 6, most of it in office hours.
        let seeds = 40;
        let mut total = 0usize;
        let mut office = 0usize;
        for seed in 0..seeds {
            let trace = Synthetic::new(Profile::OfficeWeek, seed).generate(&template());
            total += trace.jobs.len();
            office += trace
                .jobs
                .iter()
                .filter(|job| {
                    let civil = job.at.to_zoned(jiff::tz::TimeZone::UTC);
                    !matches!(civil.weekday(), Weekday::Saturday | Weekday::Sunday) && (8..17).contains(&civil.hour())
                })
                .count();
        }
        let per_week = total as f64 / seeds as f64;
        let expected = 5.0 * 64.7 + 2.0 * 6.0;
        assert!((per_week - expected).abs() < 0.05 * expected, "{per_week} jobs a week, expected about {expected}");
        let office_share = office as f64 / total as f64;
        assert!((0.75..0.85).contains(&office_share), "office hours carry {office_share:.2} of the jobs");
    }

    #[test]
    fn nightly_burst_arrives_at_two() {
        let trace = Synthetic::new(Profile::NightlyBurst, 1).generate(&template());
        let at_two = trace
            .jobs
            .iter()
            .filter(|job| {
                let civil = job.at.to_zoned(jiff::tz::TimeZone::UTC);
                civil.hour() == 2 && civil.minute() < 5
            })
            .count();
        assert!(at_two as f64 > 0.6 * trace.jobs.len() as f64, "{at_two} of {} in the bursts", trace.jobs.len());
        let long = trace.jobs.iter().filter(|job| job.duration >= SignedDuration::from_secs(360)).count();
        assert!(long * 2 > trace.jobs.len(), "burst jobs are long");
    }

    #[test]
    fn durations_stay_in_range() {
        let trace = Synthetic { days: 2, ..Synthetic::new(Profile::Demo, 3) }.generate(&template());
        assert!(trace.jobs.iter().all(|job| (10..=180).contains(&job.duration.as_secs())));
    }
}
