//! `ciscale trace`: write job traces for `ciscale simulate` — from a CI source's own history (`export`), or one
//! of the bundled synthetic ones (`synthetic`), as JSON Lines.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use jiff::{SignedDuration, Timestamp};

use ciscale::model::CiName;
use ciscale::providers::HistoryRequest;
use ciscale::simulate::synthetic::{templates_for, Profile, Synthetic};
use ciscale::simulate::trace::Trace;

use super::{hinted, ConfigArg, Ui, EXIT_OK};

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    pub command: TraceCommand,
}

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Write the jobs a CI source ran in a time window, from its own history (Woodpecker, Azure Pipelines, GitHub
    /// Actions; Forgejo keeps none that can be read)
    #[command(long_about = EXPORT_ABOUT)]
    Export(ExportArgs),
    /// Write a bundled synthetic trace (`office-week`, `nightly-burst`, `demo`) for the config's pools
    Synthetic(SyntheticArgs),
}

/// What each source contributes to an exported trace (`ciscale trace export --help`).
const EXPORT_ABOUT: &str = "Write the jobs a CI source ran in a time window, from its own history, as a trace for \
`ciscale simulate` (JSON Lines: when each job was queued, how long it ran, what it asked for). Jobs that never \
started or still run are left out and counted on stderr.

Woodpecker: every workflow of the active repositories' pipelines, queued when its pipeline was created (or \
approved, or its `depends_on` finished), with its task labels.
Azure Pipelines: the bound agent pools' recent job requests with their demands.
GitHub Actions: every workflow job (every attempt) of the source's repositories, queued at its `created_at`, run \
from `started_at` to `completed_at`, asking for its `runs-on`; about one API request per workflow run.
Forgejo: not offered (its API gives no per-job queue time); an export of every source skips it with a warning.";

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The CI source to read (a name under `ci:`); repeatable [every source of the config]
    #[arg(long, value_name = "NAME")]
    pub source: Vec<String>,
    /// How far back: `7d`, `36h`, `90m` [7d]
    #[arg(long, value_name = "DURATION", conflicts_with = "from")]
    pub since: Option<String>,
    /// Start of the window (RFC 3339)
    #[arg(long, value_name = "TIME")]
    pub from: Option<Timestamp>,
    /// End of the window (RFC 3339) [now]
    #[arg(long, value_name = "TIME")]
    pub until: Option<Timestamp>,
    /// Write the trace here instead of stdout
    #[arg(short, long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Wait out a rate limit that lifts within this long, then read on; `0` stops at the first limit (GitHub's
    /// hourly budget is about one request per workflow run) [1h]
    #[arg(long, value_name = "DURATION")]
    pub rate_limit_wait: Option<String>,
}

#[derive(Debug, Args)]
pub struct SyntheticArgs {
    /// `office-week`, `nightly-burst` or `demo`
    #[arg(value_name = "NAME", value_parser = parse_profile)]
    pub profile: Profile,
    #[command(flatten)]
    pub config: ConfigArg,
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    #[arg(long, value_name = "N", default_value_t = 7)]
    pub days: u32,
    /// Multiplies the arrival rates
    #[arg(long, value_name = "X", default_value_t = 1.0)]
    pub volume: f64,
    /// First day (RFC 3339) [2026-03-02T00:00:00Z, a Monday]
    #[arg(long, value_name = "TIME")]
    pub from: Option<Timestamp>,
    /// Write the trace here instead of stdout
    #[arg(short, long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

fn parse_profile(text: &str) -> Result<Profile, String> {
    text.parse()
}

pub async fn run(args: TraceArgs, _ui: &Ui) -> anyhow::Result<u8> {
    match args.command {
        TraceCommand::Export(args) => export(args).await,
        TraceCommand::Synthetic(args) => synthetic(args),
    }
}

async fn export(args: ExportArgs) -> anyhow::Result<u8> {
    let desired = super::load_config(&args.config, ciscale::config::Secrets::Needed)?;
    let until = args.until.unwrap_or_else(Timestamp::now);
    let from = match (args.from, &args.since) {
        (Some(from), _) => from,
        (None, since) => {
            let since = parse_duration("--since", since.as_deref().unwrap_or("7d"))?;
            until.checked_sub(since).context("`--since` reaches before the year -9999")?
        }
    };
    if from >= until {
        return Err(hinted(
            format!("the window ends ({until}) before it starts ({from})"),
            "check `--from` and `--until`",
        ));
    }
    let sources: Vec<CiName> = args.source.iter().map(|name| CiName::new(name.clone())).collect();
    for name in &sources {
        if !desired.ci.contains_key(name) {
            let known: Vec<String> = desired.ci.keys().map(|name| format!("`{name}`")).collect();
            return Err(hinted(
                format!("the config has no ci source `{name}`"),
                format!("the config has {}", known.join(", ")),
            ));
        }
    }
    let rate_limit_wait = match args.rate_limit_wait.as_deref() {
        Some(text) => parse_duration("--rate-limit-wait", text)?.unsigned_abs(),
        None => Duration::from_secs(3600),
    };
    let request = HistoryRequest { from, until, rate_limit_wait };
    let providers = super::connect(&desired)?;
    let exported = match ciscale::simulate::export::export(&desired, &providers, &sources, &request).await {
        Ok(exported) => exported,
        // A history is thousands of calls against the same hourly budget as `watch`: say what to do.
        Err(ciscale::simulate::export::ExportError::History {
            name,
            source: ciscale::providers::Error::RateLimited { retry_after, .. },
        }) => {
            let wait = retry_after.map(|wait| format!(" for {}s", wait.as_secs())).unwrap_or_default();
            let hint = match retry_after {
                Some(wait) if wait > rate_limit_wait => format!(
                    "a `--rate-limit-wait` of at least {}s waits it out; or export again once it has passed, a \
                     shorter window (`--since`) or one source at a time (`--source`)",
                    wait.as_secs()
                ),
                _ => "export again once it has passed, a shorter window (`--since`) or one source at a time \
                      (`--source`)"
                    .to_owned(),
            };
            return Err(hinted(format!("ci source `{name}` is rate limited{wait}: nothing was written"), hint));
        }
        Err(error) => return Err(error.into()),
    };
    for (name, why) in &exported.unsupported {
        eprintln!("warning: ci source `{name}` skipped: {why}");
    }
    write_trace(&exported.trace, args.out.as_ref())?;
    for (name, written) in &exported.written {
        let never = exported.never_started.get(name).copied().unwrap_or(0);
        let running = exported.still_running.get(name).copied().unwrap_or(0);
        eprintln!(
            "ci source `{name}`: {written} jobs from {from} to {until}{}{}",
            if never > 0 { format!("; {never} that never started left out") } else { String::new() },
            if running > 0 { format!("; {running} still running left out") } else { String::new() },
        );
    }
    Ok(EXIT_OK)
}

fn synthetic(args: SyntheticArgs) -> anyhow::Result<u8> {
    // Offline, like `simulate`: only the pools' labels are read.
    let desired = super::simulate::load_candidate(args.config.path())?.desired;
    let mut synthetic = Synthetic::new(args.profile, args.seed);
    synthetic.days = args.days.max(1);
    synthetic.volume = args.volume.max(0.0);
    if let Some(from) = args.from {
        synthetic.start = from;
    }
    let (templates, skipped) = templates_for(&desired, None);
    for pool in skipped {
        eprintln!("warning: no synthetic job fits pool `{pool}`; it gets none");
    }
    if templates.is_empty() {
        return Err(hinted("no pool of the config can take a synthetic job", "check the pools' `ci.labels`"));
    }
    write_trace(&synthetic.generate(&templates), args.out.as_ref())?;
    Ok(EXIT_OK)
}

fn write_trace(trace: &Trace, out: Option<&PathBuf>) -> anyhow::Result<()> {
    let mut text = Vec::new();
    trace.write_jsonl(&mut text)?;
    match out {
        Some(path) => std::fs::write(path, text).with_context(|| format!("could not write `{}`", path.display())),
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&text).and_then(|()| stdout.flush()).context("could not write to stdout")
        }
    }
}

/// `7d`, `36h`, `90m`, `1h30m`: days on top of Go's units, since a week back is the usual window. `flag` names
/// the option in the error.
fn parse_duration(flag: &str, text: &str) -> anyhow::Result<SignedDuration> {
    let text = text.trim();
    if let Some(days) = text.strip_suffix('d') {
        if let Ok(days) = days.parse::<i64>() {
            return Ok(SignedDuration::from_hours(days.saturating_mul(24)));
        }
    }
    text.parse::<ciscale::model::GoDuration>()
        .map(|duration| duration.signed())
        .map_err(|error| hinted(format!("`{flag} {text}`: {}", error.why), "write e.g. `7d`, `36h` or `90m`"))
}
