//! `ciscale simulate`: what a scaling policy would have cost and how long jobs would have waited, found by
//! replaying a trace of jobs through the real planner on a virtual clock.
//!
//! - [`trace`]: the job trace format (JSON Lines or CSV), read with every bad line located;
//! - [`synthetic`]: bundled, seeded traces (`office-week`, `nightly-burst`, `demo`);
//! - [`models`]: what is assumed about each backend (boot time, billing, prices, capacity errors);
//! - [`engine`]: the fake world and the `watch` loop on the virtual clock, through [`crate::plan::plan`];
//! - [`report`] and [`svg`]: the results as a table, JSON, side by side, and as a picture;
//! - [`export`]: a trace from a CI source's own history (`ciscale trace export`).
//!
//! Deterministic: the same config, trace, models and seed give the same report, byte for byte (the planner is a
//! pure function, the world's randomness comes from one seeded generator, and nothing iterates a hash map in a
//! way that shows).

pub mod engine;
pub mod export;
pub mod models;
pub mod report;
pub mod svg;
pub mod synthetic;
pub mod trace;

use std::collections::BTreeMap;

use jiff::Timestamp;

pub use engine::{run, Settings, GIVE_UP_AFTER};

use crate::model::{BackendName, Desired, GoDuration, ScalePolicy};
use models::Overrides;
use report::RunReport;

/// Picus's poll interval and its default `PICUS_MAX_IDLE_TIME`.
pub const PICUS_POLL: GoDuration = GoDuration::from_secs(10);
pub const PICUS_MAX_IDLE: GoDuration = GoDuration::from_secs(30 * 60);

/// The config as Picus would run it, for reference: every pool gets one agent at most, started (created) when a
/// job it takes waits and stopped (deleted) after 30 minutes idle, with no warm agents, no billing-hour
/// awareness, no schedules and no circuit breaker, polling every 10 s. Backends, machines and labels stay, so
/// the comparison is about the policy alone.
pub fn picus_policy(desired: &Desired) -> Desired {
    let mut picus = desired.clone();
    picus.poll_interval = PICUS_POLL;
    for pool in &mut picus.pools {
        pool.scale = ScalePolicy {
            min: 0,
            max: 1,
            min_idle: 0,
            jobs_per_agent: 1,
            idle_timeout: PICUS_MAX_IDLE,
            ephemeral: false,
            bootstrap_timeout: pool.scale.bootstrap_timeout,
            billing_margin: None,
            schedule: Vec::new(),
            breaker_threshold: 0,
            breaker_cooldown: pool.scale.breaker_cooldown,
        };
    }
    picus
}

/// The window a trace is simulated over unless told otherwise: from midnight (UTC) before its first job to
/// midnight after its last job's end. Whole days, so warm agents (`minIdle`) are counted for the days they
/// served and runs of different configs over one trace cover the same time.
pub fn default_window(trace: &trace::Trace) -> Option<(Timestamp, Timestamp)> {
    let (first, last) = trace.span()?;
    let day = 86_400;
    let from = Timestamp::from_second(first.as_second().div_euclid(day) * day).ok()?;
    let until_day = (last.as_second() + day - 1).div_euclid(day) * day;
    let until = Timestamp::from_second(until_day.max(from.as_second() + day)).ok()?;
    Some((from, until))
}

/// A config to simulate, with its backends' `simulation:` settings.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// What the report calls it (its path).
    pub name: String,
    pub desired: Desired,
    pub simulation: BTreeMap<BackendName, Overrides>,
}

/// Everything a `ciscale simulate` invocation asks for.
#[derive(Debug, Clone)]
pub struct Request {
    /// The first is the one compared against.
    pub candidates: Vec<Candidate>,
    /// Also run Picus's policy ([`picus_policy`]) on the first candidate's backends, named `picus`.
    pub picus: bool,
    pub trace: trace::Trace,
    pub from: Timestamp,
    pub until: Timestamp,
    pub seed: u64,
    /// The flags' overrides, by backend (`None`: all).
    pub flags: BTreeMap<Option<BackendName>, Overrides>,
    pub series: bool,
    pub skip_idle: bool,
    /// See [`Settings::give_up_after`].
    pub give_up_after: jiff::SignedDuration,
}

/// Runs every candidate (and Picus's policy, when asked) over the same trace, each on its own thread (the runs
/// share nothing, so the result does not depend on which finishes first).
pub fn run_all(request: &Request) -> Vec<RunReport> {
    let mut runs: Vec<(String, Desired, &BTreeMap<BackendName, Overrides>)> = request
        .candidates
        .iter()
        .map(|candidate| (candidate.name.clone(), candidate.desired.clone(), &candidate.simulation))
        .collect();
    if request.picus {
        if let Some(first) = request.candidates.first() {
            runs.push(("picus".to_owned(), picus_policy(&first.desired), &first.simulation));
        }
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter()
            .map(|(name, desired, simulation)| {
                let settings = Settings {
                    name: name.clone(),
                    seed: request.seed,
                    from: request.from,
                    until: request.until,
                    models: models::models_for(desired, simulation, &request.flags),
                    skip_idle: request.skip_idle,
                    series: request.series,
                    give_up_after: request.give_up_after,
                };
                scope.spawn(move || run(desired, &request.trace, &settings))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}
