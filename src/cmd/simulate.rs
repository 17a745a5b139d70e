//! `ciscale simulate`: replay a trace of jobs through the config's policy on a virtual clock and report waits,
//! agent hours and cost — per pool, in total, and side by side with other configs or Picus's policy.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use jiff::Timestamp;
use serde::Serialize;

use ciscale::simulate::report::{render_compare, RunJson};
use ciscale::simulate::synthetic::{templates_for, Profile, Synthetic};
use ciscale::simulate::{self, models, trace, Candidate, Request};

use super::{hinted, Ui, EXIT_OK};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub config: super::ConfigArg,
    /// The jobs to replay: JSON Lines, or CSV when the name ends in `.csv`; `-` reads JSON Lines from stdin
    #[arg(long, value_name = "FILE", required_unless_present = "synthetic", conflicts_with = "synthetic")]
    pub trace: Option<PathBuf>,
    /// Replay a bundled synthetic trace instead: `office-week`, `nightly-burst` or `demo`
    #[arg(long, value_name = "NAME", value_parser = parse_profile)]
    pub synthetic: Option<Profile>,
    /// Length of the synthetic trace in days
    #[arg(long, value_name = "N", default_value_t = 7, requires = "synthetic")]
    pub days: u32,
    /// Multiplies the synthetic trace's arrival rates
    #[arg(long, value_name = "X", default_value_t = 1.0, requires = "synthetic")]
    pub volume: f64,
    /// Seed of everything random: synthetic jobs, boot times, capacity errors
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Start of the simulated window (RFC 3339) [midnight UTC before the first job; a synthetic trace's start]
    #[arg(long, value_name = "TIME")]
    pub from: Option<Timestamp>,
    /// End of the simulated window (RFC 3339) [midnight UTC after the last job ends]
    #[arg(long, value_name = "TIME")]
    pub until: Option<Timestamp>,
    /// Also run these configs on the same trace and show them side by side, with changes against the first
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub compare: Vec<PathBuf>,
    /// Also run a reference policy on the first config's backends: `picus` (one agent per pool, 30 min idle)
    #[arg(long, value_enum, value_name = "POLICY")]
    pub policy: Option<Policy>,
    /// Draw queue length, serving agents and cumulative cost over time into this SVG file
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
    /// Boot time of a backend's agents (`45s` or `40s-90s`), for every backend or `BACKEND=TIME`; repeatable
    #[arg(long = "boot-time", value_name = "[BACKEND=]TIME")]
    pub boot_time: Vec<String>,
    /// Share of create attempts that find no capacity (`0.05` or `5%`), for every backend or `BACKEND=RATE`
    #[arg(long = "capacity-errors", value_name = "[BACKEND=]RATE")]
    pub capacity_errors: Vec<String>,
    /// Hourly price of a machine type (`cx22=0.006EUR`; `BACKEND:TYPE=PRICE`; type `*` for any); repeatable
    #[arg(long = "price", value_name = "[BACKEND:]TYPE=PRICE")]
    pub price: Vec<String>,
    /// Cycle through idle stretches and plan the whole config each cycle, instead of skipping them and planning
    /// only the pools that can have changed (slower, same result; for checking)
    #[arg(long, hide = true)]
    pub no_skip: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// Picus: one agent per pool, started when a job waits, stopped after 30 minutes idle
    Picus,
}

fn parse_profile(text: &str) -> Result<Profile, String> {
    text.parse()
}

pub fn run(args: SimulateArgs, _ui: &Ui) -> anyhow::Result<u8> {
    let mut candidates = vec![load_candidate(args.config.path())?];
    for path in &args.compare {
        candidates.push(load_candidate(path)?);
    }
    let flags = models::flag_overrides(&args.boot_time, &args.capacity_errors, &args.price)
        .map_err(|message| hinted(message, "see `ciscale simulate --help`"))?;
    for backend in flags.keys().flatten() {
        if !candidates.iter().any(|candidate| candidate.desired.backends.contains_key(backend)) {
            return Err(hinted(
                format!("a flag names backend `{backend}`, which no config has"),
                "name a backend under `backends:`, or leave the name out to mean every backend",
            ));
        }
    }

    let (trace, window) = match (&args.trace, args.synthetic) {
        (Some(path), _) => {
            let trace = read_trace(path)?;
            let window = simulate::default_window(&trace);
            (trace, window)
        }
        (None, Some(profile)) => {
            let mut synthetic = Synthetic::new(profile, args.seed);
            synthetic.days = args.days.max(1);
            synthetic.volume = args.volume.max(0.0);
            if let Some(from) = args.from {
                synthetic.start = from;
            }
            let (templates, skipped) = templates_for(&candidates[0].desired, None);
            for pool in &skipped {
                tracing::warn!(pool, "no synthetic job fits this pool's labels; it gets none");
            }
            if templates.is_empty() {
                return Err(hinted(
                    "no pool of the config can take a synthetic job",
                    "check the pools' `ci.labels`, or replay a trace of your own with `--trace FILE`",
                ));
            }
            (synthetic.generate(&templates), Some((synthetic.start, synthetic.until())))
        }
        (None, None) => return Err(hinted("nothing to replay", "pass `--trace FILE` or `--synthetic office-week`")),
    };
    let Some((default_from, default_until)) = window else {
        return Err(hinted("the trace has no jobs", "pass a trace with at least one job"));
    };
    let from = args.from.unwrap_or(default_from);
    let until = args.until.unwrap_or(default_until);
    if until <= from {
        return Err(hinted(
            format!("the window ends ({until}) before it starts ({from})"),
            "check `--from` and `--until`",
        ));
    }
    let total = trace.jobs.len();
    let trace = trace::Trace::new(trace.jobs.into_iter().filter(|job| job.at >= from && job.at < until).collect());
    if trace.jobs.len() < total {
        tracing::warn!(outside = total - trace.jobs.len(), %from, %until, "jobs outside the window are left out");
    }

    let request = Request {
        candidates,
        picus: args.policy == Some(Policy::Picus),
        trace,
        from,
        until,
        seed: args.seed,
        flags,
        series: args.svg.is_some(),
        skip_idle: !args.no_skip,
        give_up_after: simulate::GIVE_UP_AFTER,
    };
    let clock = std::time::Instant::now();
    let runs = simulate::run_all(&request);
    let cycles: u64 = runs.iter().map(|run| run.cycles).sum();
    tracing::info!(
        jobs = request.trace.jobs.len(),
        runs = runs.len(),
        cycles,
        secs = clock.elapsed().as_secs_f64(),
        "simulated"
    );

    if let Some(path) = &args.svg {
        let series: Vec<(&str, &simulate::svg::Series)> =
            runs.iter().filter_map(|run| run.series.as_ref().map(|series| (run.name.as_str(), series))).collect();
        std::fs::write(path, simulate::svg::render(&series))
            .with_context(|| format!("could not write the chart `{}`", path.display()))?;
    }
    if args.json {
        let text = if runs.len() == 1 {
            serde_json::to_string_pretty(&runs[0].json())?
        } else {
            #[derive(Serialize)]
            struct Named {
                name: String,
                #[serde(flatten)]
                run: RunJson,
            }
            #[derive(Serialize)]
            struct Runs {
                runs: Vec<Named>,
            }
            let runs = runs.iter().map(|run| Named { name: run.name.clone(), run: run.json() }).collect();
            serde_json::to_string_pretty(&Runs { runs })?
        };
        println!("{text}");
    } else {
        let mut out = String::new();
        for run in &runs {
            out.push_str(&run.render());
            out.push('\n');
        }
        if runs.len() > 1 {
            out.push_str(&render_compare(&runs));
        }
        print!("{out}");
    }
    Ok(EXIT_OK)
}

/// Reads a config for simulation: no secret is needed (nothing is called), so unset `${VAR}`s stand for
/// themselves.
pub(super) fn load_candidate(path: &Path) -> anyhow::Result<Candidate> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ciscale::config::ConfigError::Io { path: path.to_owned(), source })?;
    let env = |name: &str| std::env::var(name).ok().or_else(|| Some(format!("unset-{name}")));
    let loaded = ciscale::config::load_str_with_simulation(&path.display().to_string(), &text, &env)?;
    Ok(Candidate { name: path.display().to_string(), desired: loaded.desired, simulation: loaded.simulation })
}

fn read_trace(path: &Path) -> anyhow::Result<trace::Trace> {
    let trace = if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("could not read the trace from stdin")?;
        trace::parse_jsonl("<stdin>", &text)?
    } else {
        trace::read_file(path)?
    };
    Ok(trace)
}
